"""The fleet snapshot: what every endpoint is doing right now, in one JSON-ready dict.

Built from the in-process structures only (no database, no network), so it is cheap
enough to build on every change. It never contains api keys. Token totals are not routing's:
stats/snapshot.py adds them for the page and the NOMYO usage API.
"""

from __future__ import annotations

import os
import time
from typing import cast

from routing.engine.board import board
from routing.fleet import caches
from routing.fleet.breaker import CLOSED, State, breakers
from routing.fleet.registry import registry
from routing.observability.metrics import INSTANCE
from routing.status.types import BreakerState, EndpointState, FleetSnapshot


def build() -> FleetSnapshot:
    """This process's view (shapes: routing/status/types.py)."""
    endpoints = registry.cached()
    active = board.active()
    breaker_views = breakers.snapshot()
    loaded = caches.loaded.snapshot()
    advertised = caches.advertised.snapshot()
    versions = caches.versions.snapshot()
    by_id = {ep.id: ep for ep in endpoints}
    states: list[EndpointState] = []
    for ep in endpoints:
        view = breaker_views.get(ep.id, CLOSED)
        states.append(
            {
                "id": ep.id,
                "name": ep.name,
                "url": ep.url,
                "kind": ep.kind,
                "enabled": ep.enabled,
                "limit": ep.limit,
                "tier": ep.tier,
                "weight": ep.weight,
                "healthy": view.state is State.CLOSED and ep.id in advertised,
                # The circuit breaker: closed, open (out of rotation) or half_open (on trial);
                # failing_since is when it left closed and does not restart while it stays out.
                "breaker": cast(BreakerState, view.state.value),
                "failing_since": view.since,
                "failing_reason": view.reason if view.since is not None else None,
                "version": versions.get(ep.id),
                "models": list(advertised[ep.id].names) if ep.id in advertised else [],
                "loaded": list(loaded[ep.id].names) if ep.id in loaded else [],
                "active": sum(n for (eid, _), n in active.items() if eid == ep.id),
            }
        )
    return {
        "type": "usage.snapshot",
        "instance": INSTANCE,
        "pid": os.getpid(),
        "taken_at": time.time(),
        "endpoints": states,
        "active": [
            {
                "endpoint": by_id[eid].name if eid in by_id else str(eid),
                "endpoint_id": eid,
                "model": model,
                "count": n,
            }
            for (eid, model), n in sorted(active.items())
        ],
        "queued": board.queued(),
    }
