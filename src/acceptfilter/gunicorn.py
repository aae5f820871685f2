"""``gunicorn -c python:acceptfilter.gunicorn ...``: gunicorn behind an accept filter.

Only gunicorn's server hooks live here, because gunicorn applies every name of
a config module that matches one of its settings. See
:mod:`acceptfilter.integrations.gunicorn` for how it works and for
``install(globals(), ...)``, the one line for your own config file.
"""

from .integrations.gunicorn import install, on_exit, on_reload, on_starting, post_fork, when_ready

__all__ = ["install", "on_exit", "on_reload", "on_starting", "post_fork", "when_ready"]
