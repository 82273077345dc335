from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from stats.rollup import DEFAULT_DAYS, roll_up


class Command(BaseCommand):
    help = (
        "Fold per-minute token rows of the UTC days that ended at least --days days ago into one "
        "row per endpoint, model and day (TokenDaily). Rows are moved, not copied: each folded "
        "minute row is added to its day's row and deleted in the same transaction, so no total "
        "ever changes (/api/stats and the CSV export read both tables) and running the command "
        "again folds nothing twice. Safe to run from cron while the router serves."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            default=DEFAULT_DAYS,
            help=f"Keep minute detail for this many days (at least 1; default {DEFAULT_DAYS}).",
        )
        parser.add_argument(
            "--trim-old",
            action="store_true",
            help=(
                "Accepted for NOMYO Router compatibility. There it deleted the folded rows; here "
                "folded rows are always deleted (that is what keeps totals exact), so it changes nothing."
            ),
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Only count what would be folded; change nothing."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days: int = options["days"]
        try:
            result = roll_up(days, dry_run=options["dry_run"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        verb = "Would fold" if result.dry_run else "Folded"
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb} {result.rows} minute rows into {result.groups} daily rows "
                f"(days before {result.cutoff:%Y-%m-%d} UTC)."
            )
        )
