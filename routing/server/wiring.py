"""Connects routing's owners to each other at start-up: called once from `RoutingConfig.ready`.

The lower layers never import the upper ones; where a lower owner's change must reach an
upper one (the registry reloaded, so the board's limits change), the upper side connects a
receiver to the lower owner's `Signal` here. Installing twice changes nothing (connect is
idempotent).
"""

from __future__ import annotations

from routing.engine.accounting import metrics_sink, sinks
from routing.engine.board import board
from routing.fleet import caches
from routing.fleet.registry import EndpointInfo, registry


def _limits_follow(endpoints: tuple[EndpointInfo, ...], changed: tuple[int, ...]) -> None:
    board.apply_endpoints(endpoints)


def _caches_follow(endpoints: tuple[EndpointInfo, ...], changed: tuple[int, ...]) -> None:
    """What this process cached about a changed endpoint (or an id reused after a delete)
    must not outlive the change, whichever process made it."""
    for endpoint_id in changed:
        caches.invalidate_endpoint(endpoint_id)


def install() -> None:
    sinks.install(metrics_sink)
    registry.reloaded.connect(_limits_follow)
    registry.reloaded.connect(_caches_follow)
