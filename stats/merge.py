"""Merging the usage snapshots of several router processes into the one the page shows.

Each process publishes its own part (active requests, queue, endpoint state, and its
token numbers as "database totals at my last read" plus "mine not in that read"). The
page shows: active and queued summed over live processes; the endpoint list from the
newest part that has one, each endpoint's state combined over all live parts (failing
when any process finds it failing, healthy when one has seen it answer, models and
loaded models as seen by any); tokens (in all, and by client) = the newest database
read + every process's pending numbers. A process that has not published for STALE_AFTER seconds drops out.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from routing.status.types import ActiveRow, BreakerState, EndpointState
from stats.types import ClientRow, MergedSnapshot, TokenRow, UsagePart

STALE_AFTER = 6.0


def merge(parts: Mapping[str, UsagePart], *, now: float | None = None) -> MergedSnapshot:
    """The live parts (instance -> part; taken within STALE_AFTER seconds of `now`) in one.
    Parts come from other processes, so a missing key reads as empty rather than failing."""
    now = time.time() if now is None else now
    live = [p for p in parts.values() if now - p.get("taken_at", 0) <= STALE_AFTER]
    if not live:
        return {
            "type": "usage.snapshot",
            "taken_at": now,
            "processes": 0,
            "endpoints": [],
            "active": [],
            "tokens": [],
            "queued": {},
            "clients": [],
        }
    newest = max(live, key=lambda p: p.get("taken_at", 0))
    active: dict[tuple[int, str], ActiveRow] = {}
    per_endpoint: dict[int, int] = {}
    for part in live:
        for row in part.get("active", []):
            key = (row["endpoint_id"], row["model"])
            if key in active:
                active[key]["count"] += row["count"]
            else:
                active[key] = row.copy()  # the sums must not change the part
            per_endpoint[row["endpoint_id"]] = per_endpoint.get(row["endpoint_id"], 0) + row["count"]
    queued: dict[str, int] = {}
    for part in live:
        for model, n in part.get("queued", {}).items():
            queued[model] = queued.get(model, 0) + n
    endpoints = _endpoints(live, per_endpoint)
    return {
        "type": "usage.snapshot",
        "taken_at": newest.get("taken_at", now),
        "processes": len(live),
        "endpoints": endpoints,
        "active": sorted(active.values(), key=lambda r: (str(r["endpoint"]), r["model"])),
        "tokens": _tokens(live),
        "queued": queued,
        "clients": _clients(live),
    }


def _taken_at(part: UsagePart) -> float:
    return float(part.get("taken_at", 0))


def _union(lists: list[list[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for names in lists:
        for name in names:
            seen.setdefault(name, None)
    return list(seen)


def _endpoints(live: list[UsagePart], per_endpoint: dict[int, int]) -> list[EndpointState]:
    newest_first = sorted(live, key=_taken_at, reverse=True)
    # A process that has not loaded its endpoint list yet (just started) publishes none.
    base = next((p for p in newest_first if p.get("endpoints")), newest_first[0])
    views: dict[int, list[EndpointState]] = {}
    for part in newest_first:
        for ep in part.get("endpoints", []):
            views.setdefault(ep["id"], []).append(ep)
    merged: list[EndpointState] = []
    for ep in base.get("endpoints", []):
        seen = views.get(ep["id"], [ep])
        row = ep.copy()  # then each field combined over the processes
        row["active"] = per_endpoint.get(ep["id"], 0)
        failing = [v for v in seen if v.get("failing_since") is not None]
        if failing:
            row["healthy"] = False
            row["failing_since"] = min(s for v in failing if (s := v["failing_since"]) is not None)
            row["failing_reason"] = failing[0].get("failing_reason")  # the newest word on it
        else:
            row["healthy"] = any(v.get("healthy") for v in seen)
            row["failing_since"] = None
            row["failing_reason"] = None
        # The breaker as the most cautious process sees it: open, else half_open, else closed.
        states = {v.get("breaker", "closed") for v in seen}
        cautious: tuple[BreakerState, ...] = ("open", "half_open")
        row["breaker"] = next((s for s in cautious if s in states), "closed")
        row["version"] = next((v["version"] for v in seen if v.get("version")), None)
        row["models"] = _union([v.get("models", []) for v in seen])
        row["loaded"] = _union([v.get("loaded", []) for v in seen])
        merged.append(row)
    return merged


def _tokens(live: list[UsagePart]) -> list[TokenRow]:
    with_parts = [p for p in live if "token_parts" in p]
    if not with_parts:
        return live[0].get("tokens", []) if live else []
    base = max(with_parts, key=lambda p: p["token_parts"].get("db_read_at", 0))["token_parts"]
    sums: dict[tuple[str, str], list[int]] = {}
    for endpoint, model, inp, out, *_ in base.get("db", []):
        sums[(endpoint, model)] = [inp, out]
    for part in with_parts:
        for endpoint, model, inp, out, *_ in part["token_parts"].get("pending", []):
            row = sums.setdefault((endpoint, model), [0, 0])
            row[0] += inp
            row[1] += out
    return [
        {"endpoint": e, "model": m, "input": v[0], "output": v[1], "total": v[0] + v[1]}
        for (e, m), v in sorted(sums.items())
    ]


def _clients(live: list[UsagePart]) -> list[ClientRow]:
    """Tokens and slots by client: the newest database read plus every process's pending numbers
    (as `_tokens`), slots summed. [{"client", "active", "input", "output", "total"}] by name."""
    with_parts = [p for p in live if "client_parts" in p]
    if not with_parts:
        return []
    base = max(with_parts, key=lambda p: p["client_parts"].get("db_read_at", 0))["client_parts"]
    sums: dict[str, list[int]] = {}
    for client, inp, out, *_ in base.get("db", []):
        sums[client] = [inp, out, 0]
    for part in with_parts:
        for client, inp, out, *_ in part["client_parts"].get("pending", []):
            row = sums.setdefault(client, [0, 0, 0])
            row[0] += inp
            row[1] += out
        for client, n in part["client_parts"].get("active", {}).items():
            sums.setdefault(client, [0, 0, 0])[2] += n
    return [
        {"client": c or "-", "active": v[2], "input": v[0], "output": v[1], "total": v[0] + v[1]}
        for c, v in sorted(sums.items())
    ]
