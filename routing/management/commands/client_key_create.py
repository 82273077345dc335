from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError

from routing.auth.client_keys import hash_key, new_key, prefix_of, split_models
from routing.fleet import control
from routing.models import ClientKey


def _positive(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _expiry(value: str) -> datetime:
    """An ISO date (the key ends at that day's start, UTC) or date-time (naive: UTC)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--expires: {value!r} is not an ISO date or date-time") from None
    if len(value) <= 10:
        moment = datetime.combine(moment.date(), time.min)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Create a client key and print it (alone, on the last line). The key is shown only now: "
        "only its hash is stored."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--owner", help="username of its owner")
        parser.add_argument("--models", default="", help="allowed models or patterns, comma-separated")
        parser.add_argument("--rpm", type=_positive, help="requests per minute")
        parser.add_argument("--tpm", type=_positive, help="tokens per minute")
        parser.add_argument("--concurrency", type=_positive, help="concurrent requests")
        parser.add_argument("--daily-tokens", type=_positive, help="tokens per UTC day")
        parser.add_argument("--monthly-tokens", type=_positive, help="tokens per UTC month")
        parser.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
        parser.add_argument("--expires", type=_expiry, help="ISO date or date-time (UTC)")

    def handle(self, *args: Any, **options: Any) -> None:
        owner = None
        if options["owner"]:
            users = get_user_model()
            try:
                owner = users.objects.get(**{users.USERNAME_FIELD: options["owner"]})
            except users.DoesNotExist:
                raise CommandError(f"no user {options['owner']!r}") from None
        key = new_key()
        row = ClientKey(
            name=options["name"],
            owner=owner,
            prefix=prefix_of(key),
            key_hash=hash_key(key),
            allowed_models=", ".join(split_models(options["models"])),
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
        self.stdout.write(
            f"Created client key {row.name!r} ({row.prefix}…). Store it now; it is not shown again:"
        )
        self.stdout.write(key)
