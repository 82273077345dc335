"""Configuration mistakes, reported by `manage.py check` and at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

from routing.server.cors import clean


@register()
def router_settings(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    problems: list[Error | Warning] = []
    for name in (
        "ROUTER_QUEUE_TIMEOUT",
        "ROUTER_FLUSH_INTERVAL",
        "ROUTER_CONNECT_TIMEOUT",
        "ROUTER_FIRST_BYTE_TIMEOUT",
        "ROUTER_READ_TIMEOUT",
    ):
        if getattr(settings, name) <= 0:
            problems.append(Error(f"{name} must be greater than zero.", id="routing.E001"))
    if settings.ROUTER_QUEUE_MAX < 0:
        problems.append(Error("ROUTER_QUEUE_MAX must not be negative.", id="routing.E002"))
    if settings.ROUTER_FALLBACK_WAIT < 0:
        problems.append(Error("ROUTER_FALLBACK_WAIT must not be negative.", id="routing.E004"))
    if settings.ROUTER_MAX_BODY < 1024:
        problems.append(Error("ROUTER_MAX_BODY must be at least 1024 bytes.", id="routing.E003"))
    if settings.ROUTER_CONFIG:
        if not Path(settings.ROUTER_CONFIG).is_file():
            problems.append(
                Warning(
                    f"ROUTER_CONFIG names {settings.ROUTER_CONFIG}, which is not a file.", id="routing.W001"
                )
            )
    if not settings.DEBUG and settings.SECRET_KEY.startswith("dev-only"):
        problems.append(
            Warning(
                "SECRET_KEY is the development default; set SECRET_KEY in the environment.", id="routing.W002"
            )
        )
    return problems


@register()
def router_origins(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    """ROUTER_ORIGINS entries that can never match: an `Origin` header is `scheme://host[:port]`."""
    shape = re.compile(r"\*|null|[a-z][a-z0-9+.*-]*://[^/?#\s]*")
    return [
        Warning(
            f"ROUTER_ORIGINS entry {entry!r} is not an origin (scheme://host[:port], no path); "
            "it never matches.",
            id="routing.W020",
        )
        for entry in settings.ROUTER_ORIGINS
        if clean(entry) and not shape.fullmatch(clean(entry))
    ]


@register()
def affinity_settings(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    """Prompt-cache affinity's bounds (routing/engine/affinity.py)."""
    problems: list[Error | Warning] = []
    if settings.ROUTER_AFFINITY_TTL <= 0:
        problems.append(Error("ROUTER_AFFINITY_TTL must be greater than zero.", id="routing.E030"))
    if settings.ROUTER_AFFINITY_MAX < 1:
        problems.append(Error("ROUTER_AFFINITY_MAX must be at least 1.", id="routing.E031"))
    if settings.ROUTER_AFFINITY_WAIT < 0:
        problems.append(Error("ROUTER_AFFINITY_WAIT must not be negative.", id="routing.E032"))
    if settings.ROUTER_AFFINITY and settings.ROUTER_AFFINITY_WAIT >= settings.ROUTER_QUEUE_TIMEOUT > 0:
        problems.append(
            Warning(
                "ROUTER_AFFINITY_WAIT is not shorter than ROUTER_QUEUE_TIMEOUT: a request could time out "
                "waiting for its conversation's server while others are free.",
                id="routing.W030",
            )
        )
    return problems
