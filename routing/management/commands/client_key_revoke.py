from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from routing.fleet import control
from routing.models import ClientKey


class Command(BaseCommand):
    help = (
        "Revoke (disable) a client key by name: refused with 403 from the next request on in every"
        " router process with REDIS_URL, else within ROUTER_REGISTRY_RELOAD seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        updated = ClientKey.objects.filter(name=options["name"]).update(enabled=False)
        if not updated:
            raise CommandError(f"no client key {options['name']!r}")
        control.keys_changed()
        self.stdout.write(f"Revoked client key {options['name']!r}.")
