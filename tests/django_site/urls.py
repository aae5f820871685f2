"""``/state``: the listener's counters and what the application saw; anything else: hello + the filter's info."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse
from django.urls import re_path

from acceptfilter.integrations.wsgi import environ_info

from .management.commands.runserver import SERVERS

seen: list[str] = []


def state(request: HttpRequest) -> HttpResponse:
    return HttpResponse(json.dumps({"stats": SERVERS[0].socket.stats(), "seen": seen}, default=str))


def hello(request: HttpRequest) -> HttpResponse:
    seen.append(request.path)
    info = environ_info(request.META)
    return HttpResponse(f"hello {info['target'] if info else None} {info.reason if info else None}")


urlpatterns = [re_path(r"^state$", state), re_path(r".*", hello)]
