"""One module per server family: how each server gets a FilteredListener."""
