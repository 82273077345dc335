"""The usage snapshot: routing's fleet snapshot (routing/status/snapshot.py) plus this process's
live token totals from the recorder, as the page, the merge and /api/usage read it.

"tokens": [{"endpoint": url, "model", "input", "output", "total"}] sorted by (url, model);
the keys keep the order they had when routing built the whole snapshot. Shapes: stats/types.py.
"""

from __future__ import annotations

from routing.status import snapshot as fleet_snapshot
from stats.recorder import recorder
from stats.types import UsageSnapshot


def build() -> UsageSnapshot:
    fleet = fleet_snapshot.build()
    totals = recorder.totals()
    return {
        "type": fleet["type"],
        "instance": fleet["instance"],
        "pid": fleet["pid"],
        "taken_at": fleet["taken_at"],
        "endpoints": fleet["endpoints"],
        "active": fleet["active"],
        "tokens": [
            {"endpoint": ep, "model": model, "input": t[0], "output": t[1], "total": t[2]}
            for (ep, model), t in sorted(totals.items())
        ],
        "queued": fleet["queued"],
    }
