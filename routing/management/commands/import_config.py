from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from routing.fleet.services import ConfigError, import_config_file


class Command(BaseCommand):
    help = (
        "Import endpoints (and the router api key) from a NOMYO Router config.yaml, and the"
        " router's own `aliases:` and `fallbacks:`. Idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help="Path to config.yaml")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = import_config_file(options["path"])
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(f"Imported {options['path']}: {result}"))
