"""gunicorn (sync and gthread workers) behind an accept filter, with no code change.

Enable it with gunicorn's own config mechanism::

    ACCEPTFILTER_FILTER=httpready gunicorn -c python:acceptfilter.gunicorn -w 4 app:app

or, with a config file of your own, one line in it::

    import acceptfilter.gunicorn; acceptfilter.gunicorn.install(globals(), filter="httpready", timeout=10)

How it works: workers look first, one filter process holds the rest.
Each worker's listen socket is replaced by a :class:`.first_look.FirstLookListener`:
the worker accepts from the real listen socket as before, peeks, and runs the
filters on what is there; a connection whose request is complete (the
common case, helped by ``TCP_DEFER_ACCEPT``) is served at once, with no
other process involved. A connection that has sent too little is passed
(``SCM_RIGHTS``) to the one filter process the arbiter starts
(:mod:`.filter_process`), which holds it until the filters are satisfied or
a policy applies, and then hands it, with what the filters learnt, into one
``SOCK_SEQPACKET`` channel per listener that every worker reads: an idle
worker takes the next ready connection, a busy one leaves it to the others,
as with the kernel's accept queue. Held and ready connections live outside
the workers, so killing a worker, recycling it (``max_requests``) or
reloading (HUP) loses none of them; if the filter process dies the arbiter
restarts it (workers keep serving complete requests meanwhile), and a HUP
that changes the settings starts a new one before the old one hands its held
connections over.

Settings, from the environment (which wins) or :func:`install`:
``ACCEPTFILTER_FILTER`` (a spec, or a chain of specs separated by spaces;
default ``httpready``), ``ACCEPTFILTER_TIMEOUT`` (seconds a request that has
begun may take to arrive, from its first byte), ``ACCEPTFILTER_IDLE_TIMEOUT``
(seconds a connection that has sent nothing is held, default 620, longer than
any common balancer's idle timeout; 0: no limit),
``ACCEPTFILTER_ON_TIMEOUT`` (``close``, the default: a partial HTTP request gets
``408 Request Timeout``, then a FIN; ``surface`` would pin a sync or gthread
worker; ``reset``),
``ACCEPTFILTER_MAX_HELD`` (default: the filter process's fd limit, raised to
its hard limit, less 256), ``ACCEPTFILTER_CORE`` (``c`` or ``python``) and
``ACCEPTFILTER_DEFER_ACCEPT`` (``TCP_DEFER_ACCEPT`` seconds on the listen
sockets, default 1, 0 for off: workers then rarely accept a connection whose
request has not arrived yet) and ``ACCEPTFILTER_METRICS_PORT`` (``PORT`` or
``HOST:PORT``: the filter process serves Prometheus metrics there, every
filtered port summed with the kernel's view of it; needs prometheus_client).
An application reads what the filters learnt with
``acceptfilter.connection_info(environ["gunicorn.socket"])`` (or
:func:`connection_info` here).
"""

from .hooks import connection_info, install, on_exit, on_reload, on_starting, post_fork, settings, when_ready

__all__ = ["connection_info", "install", "on_exit", "on_reload", "on_starting", "post_fork", "settings", "when_ready"]
