"""runserver behind httpready: what the docs (docs/how-to/django-werkzeug.md) tell a Django project to add, plus a handle for the test."""

from __future__ import annotations

from typing import Any

from django.core.management.commands.runserver import Command as Base

from acceptfilter.integrations.django import FilteredWSGIServer

SERVERS: list[Any] = []


class Server(FilteredWSGIServer):
    accept_filter_options = {"timeout": 60}

    def server_activate(self) -> None:
        super().server_activate()
        SERVERS.append(self)


class Command(Base):
    server_cls = Server
