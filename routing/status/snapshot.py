"""The fleet snapshot: what every endpoint is doing right now, in one JSON-ready dict.

Built from the in-process structures only (no database, no network), so it is cheap
enough to build on every change. It never contains api keys. Token totals are not routing's:
stats/snapshot.py adds them for the page and the NOMYO usage API.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from routing.engine.board import board
from routing.fleet import caches
from routing.fleet.breaker import CLOSED, State, breakers
from routing.fleet.registry import registry
from routing.observability.metrics import INSTANCE


def build() -> dict[str, Any]:
    endpoints = registry.cached()
    active = board.active()
    breaker_views = breakers.snapshot()
    loaded = caches.loaded.snapshot()
    advertised = caches.advertised.snapshot()
    versions = caches.versions.snapshot()
    by_id = {ep.id: ep for ep in endpoints}
    states = []
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
                "healthy": view.state is State.CLOSED and ep.id in advertised,
                # The circuit breaker: closed, open (out of rotation) or half_open (on trial);
                # failing_since is when it left closed and does not restart while it stays out.
                "breaker": view.state.value,
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


def prometheus_gauges() -> Iterable[str]:
    from routing.observability.metrics import _labels

    snap = build()
    yield "# HELP router_in_flight Requests holding a slot, by endpoint and model."
    yield "# TYPE router_in_flight gauge"
    for row in snap["active"]:
        labels = _labels((("endpoint", row["endpoint"]), ("model", row["model"])))
        yield f"router_in_flight{labels} {row['count']}"
    yield "# HELP router_queued Requests waiting for a slot, by model."
    yield "# TYPE router_queued gauge"
    for model, n in snap["queued"].items():
        yield f"router_queued{_labels((('model', model),))} {n}"
    yield "# HELP router_endpoint_up 1 when the endpoint is enabled and its breaker is not open."
    yield "# TYPE router_endpoint_up gauge"
    for ep in snap["endpoints"]:
        up = 1 if ep["enabled"] and ep["breaker"] != State.OPEN.value else 0
        yield f"router_endpoint_up{_labels((('endpoint', ep['name']),))} {up}"
    yield "# HELP router_endpoint_breaker_state 1 for the circuit breaker's current state, per endpoint."
    yield "# TYPE router_endpoint_breaker_state gauge"
    for ep in snap["endpoints"]:
        for state in State:
            value = 1 if ep["breaker"] == state.value else 0
            labels = _labels((("endpoint", ep["name"]), ("state", state.value)))
            yield f"router_endpoint_breaker_state{labels} {value}"
    yield "# HELP router_endpoint_breaker_since_seconds Unix time the endpoint left closed (0: closed)."
    yield "# TYPE router_endpoint_breaker_since_seconds gauge"
    for ep in snap["endpoints"]:
        since = ep["failing_since"] or 0
        yield f"router_endpoint_breaker_since_seconds{_labels((('endpoint', ep['name']),))} {since}"
    yield "# HELP router_endpoint_breaker_reason The latest evidence against an endpoint out of closed."
    yield "# TYPE router_endpoint_breaker_reason gauge"
    for ep in snap["endpoints"]:
        if ep["failing_since"] is not None:
            labels = _labels((("endpoint", ep["name"]), ("reason", str(ep["failing_reason"])[:200])))
            yield f"router_endpoint_breaker_reason{labels} 1"
