"""The built-in filters, one small sans-IO module each.

They are registered through the ``acceptfilter.filters`` entry-point group,
exactly like a third-party filter: see ``pyproject.toml``.
"""
