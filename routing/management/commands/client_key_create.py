from __future__ import annotations

import argparse
from datetime import UTC, datetime, time
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError

from routing.auth.client_keys import hash_key, new_key, prefix_of, split_models
from routing.fleet import control
from routing.models import ClientKey


def _limit(value: str) -> int:
    """A limit: a whole number, at least 1 (leave the option out for none). Raises
    ArgumentTypeError, which argparse shows as a usage error naming the option."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r}: a limit is at least 1 (leave the option out for no limit)"
        )
    return number


def _expiry(value: str) -> datetime:
    """An ISO date (the key ends at that day's start, UTC) or date-time (naive: UTC). Raises
    ArgumentTypeError (a usage error, no traceback) for anything else."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO date (2027-01-01) or date-time (2027-01-01T12:00)"
        ) from None
    if len(value) <= 10:
        moment = datetime.combine(moment.date(), time.min)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Create a client key and print it (alone, on the last line). The key is shown only now: "
        "only its hash is stored."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="shown in usage statistics and logs: letters, digits and _ . @ -")
        parser.add_argument("--owner", help="username of an existing Django user (e.g. an admin user)")
        parser.add_argument(
            "--models", help="allowed models or patterns, comma-separated (left out: every model)"
        )
        parser.add_argument("--rpm", type=_limit, help="requests per minute (at least 1)")
        parser.add_argument("--tpm", type=_limit, help="tokens per minute")
        parser.add_argument("--concurrency", type=_limit, help="concurrent requests")
        parser.add_argument("--daily-tokens", type=_limit, help="tokens per UTC day")
        parser.add_argument("--monthly-tokens", type=_limit, help="tokens per UTC month")
        parser.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
        parser.add_argument("--expires", type=_expiry, help="ISO date or date-time (UTC)")

    def handle(self, *args: Any, **options: Any) -> None:
        owner = None
        if options["owner"]:
            users = get_user_model()
            try:
                owner = users.objects.get(**{users.USERNAME_FIELD: options["owner"]})
            except users.DoesNotExist:
                raise CommandError(
                    f"no user {options['owner']!r}: --owner names an existing Django user "
                    "(create it first, e.g. in the admin's Users, or leave --owner out)"
                ) from None
        models = options["models"]
        if models is not None and not split_models(models):
            raise CommandError(
                f"--models {models!r} names no model: give names or patterns, or leave --models out "
                "for every model"
            )
        key = new_key()
        row = ClientKey(
            name=options["name"].strip(),
            owner=owner,
            prefix=prefix_of(key),
            key_hash=hash_key(key),
            allowed_models=", ".join(split_models(models or "")),
            priority=options["priority"],
            rpm=options["rpm"],
            tpm=options["tpm"],
            concurrency=options["concurrency"],
            daily_tokens=options["daily_tokens"],
            monthly_tokens=options["monthly_tokens"],
            expires=options["expires"],
        )
        try:
            row.full_clean()
            row.save()
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from None
        except IntegrityError:
            raise CommandError(f"a key named {row.name!r} exists") from None
        control.keys_changed()
        if row.expires is not None and row.expires <= datetime.now(UTC):
            passed = row.expires.isoformat()
            self.stderr.write(f"Note: --expires {passed} has passed: the key is refused (403).")
        self.stdout.write(
            f"Created client key {row.name!r} ({row.prefix}…). Store it now; it is not shown again:"
        )
        self.stdout.write(key)
