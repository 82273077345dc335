"""The usage snapshot: what every endpoint is doing right now, in one JSON-ready dict.

Built from the in-process structures only (no database, no network), so it is cheap
enough to build on every change. It never contains api keys.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from routing import caches
from routing.board import board
from routing.metrics import INSTANCE
from routing.registry import registry
from stats.recorder import recorder


def build() -> dict[str, Any]:
    endpoints = registry.cached()
    active = board.active()
    totals = recorder.totals()
    failing = caches.failing.snapshot()
    loaded = caches.loaded.snapshot()
    advertised = caches.advertised.snapshot()
    versions = caches.versions.snapshot()
    by_id = {ep.id: ep for ep in endpoints}
    states = []
    for ep in endpoints:
        mark = failing.get(ep.id)
        states.append(
            {
                "id": ep.id,
                "name": ep.name,
                "url": ep.url,
                "kind": ep.kind,
                "enabled": ep.enabled,
                "limit": ep.limit,
                "healthy": mark is None and ep.id in advertised,
                "failing_since": mark.since if mark else None,
                "failing_reason": mark.reason if mark else None,
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
        "tokens": [
            {"endpoint": ep, "model": model, "input": t[0], "output": t[1], "total": t[2]}
            for (ep, model), t in sorted(totals.items())
        ],
        "queued": board.queued(),
    }


def prometheus_gauges() -> Iterable[str]:
    from routing.metrics import _labels

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
    yield "# HELP router_endpoint_up 1 when the endpoint is enabled and not failing."
    yield "# TYPE router_endpoint_up gauge"
    for ep in snap["endpoints"]:
        up = 1 if ep["enabled"] and ep["failing_since"] is None else 0
        yield f"router_endpoint_up{_labels((('endpoint', ep['name']),))} {up}"
