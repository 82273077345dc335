"""Merging the per-process usage parts into the one snapshot the page shows (stats/merge.py)."""

from __future__ import annotations

from typing import Any, cast

from routing.status.types import EndpointState
from stats.merge import STALE_AFTER, merge
from stats.types import UsagePart

NOW = 1_000_000.0
URL = "http://gpu-1:11434"


def ep(**fields: Any) -> EndpointState:
    row: dict[str, Any] = {
        "id": 1,
        "name": "gpu-1",
        "url": URL,
        "kind": "ollama",
        "enabled": True,
        "limit": 2,
        "tier": 0,
        "weight": 1,
        "healthy": True,
        "failing_since": None,
        "failing_reason": None,
        "version": "0.12.3",
        "models": ["llama3:latest"],
        "loaded": [],
        "active": 0,
    }
    row.update(fields)
    return cast(EndpointState, row)


def part(
    instance: str,
    *,
    age: float = 0.0,
    endpoints: list[EndpointState] | None = None,
    active: tuple[tuple[int, str, int], ...] = (),
    queued: dict[str, int] | None = None,
    db: list[list[Any]] | None = None,
    db_read_at: float = 0.0,
    pending: list[list[Any]] | None = None,
) -> UsagePart:
    part: dict[str, Any] = {
        "type": "usage.snapshot",
        "instance": instance,
        "taken_at": NOW - age,
        "endpoints": [ep()] if endpoints is None else endpoints,
        "active": [{"endpoint": "gpu-1", "endpoint_id": e, "model": m, "count": n} for e, m, n in active],
        "queued": queued or {},
        "tokens": [],
        "token_parts": {"db_read_at": db_read_at, "db": db or [], "pending": pending or []},
    }
    return cast(UsagePart, part)  # as a part arrives from another process (lists, not tuples)


def test_active_and_queued_are_summed_over_processes() -> None:
    merged = merge(
        {
            "a": part("a", active=((1, "llama3:latest", 1),), queued={"llama3:latest": 2}),
            "b": part("b", age=1, active=((1, "llama3:latest", 1), (1, "qwen:7b", 1)), queued={"x": 1}),
        },
        now=NOW,
    )
    assert merged["processes"] == 2
    assert [(r["model"], r["count"]) for r in merged["active"]] == [("llama3:latest", 2), ("qwen:7b", 1)]
    assert merged["endpoints"][0]["active"] == 3
    assert merged["queued"] == {"llama3:latest": 2, "x": 1}


def test_a_silent_process_drops_out() -> None:
    merged = merge(
        {
            "a": part("a", active=((1, "m", 1),)),
            "gone": part(
                "gone", age=STALE_AFTER + 0.5, active=((1, "m", 5),), pending=[[URL, "m", 10, 10, 1, 0]]
            ),
        },
        now=NOW,
    )
    assert merged["processes"] == 1
    assert merged["endpoints"][0]["active"] == 1
    assert merged["tokens"] == []


def test_nothing_live_is_an_empty_snapshot() -> None:
    merged = merge({"old": part("old", age=60)}, now=NOW)
    assert merged["processes"] == 0 and merged["endpoints"] == [] and merged["active"] == []


def test_tokens_are_the_newest_database_read_plus_every_pending_part() -> None:
    merged = merge(
        {
            # a flushed last: its read holds everything written so far
            "a": part(
                "a", db=[[URL, "m", 100, 50, 3, 0]], db_read_at=NOW - 1, pending=[[URL, "m", 1, 2, 1, 0]]
            ),
            "b": part(
                "b", db=[[URL, "m", 90, 40, 2, 0]], db_read_at=NOW - 5, pending=[[URL, "m", 10, 20, 1, 0]]
            ),
        },
        now=NOW,
    )
    assert merged["tokens"] == [{"endpoint": URL, "model": "m", "input": 111, "output": 72, "total": 183}]


def test_endpoint_state_is_combined_over_processes() -> None:
    fresh = ep(healthy=False, version=None, models=[], loaded=[])  # a process that has not probed yet
    seen = ep(models=["llama3:latest", "qwen:7b"], loaded=["llama3:latest"])
    merged = merge(
        {"new": part("new", endpoints=[fresh]), "old": part("old", age=1, endpoints=[seen])}, now=NOW
    )
    (row,) = merged["endpoints"]
    assert row["healthy"] is True and row["failing_since"] is None
    assert row["version"] == "0.12.3"
    assert row["models"] == ["llama3:latest", "qwen:7b"] and row["loaded"] == ["llama3:latest"]

    failing = ep(healthy=False, failing_since=NOW - 30, failing_reason="connection refused")
    merged = merge({"a": part("a", endpoints=[ep()]), "b": part("b", age=1, endpoints=[failing])}, now=NOW)
    (row,) = merged["endpoints"]
    assert row["healthy"] is False
    assert row["failing_since"] == NOW - 30 and row["failing_reason"] == "connection refused"


def test_a_process_without_its_endpoint_list_yet_does_not_blank_the_page() -> None:
    merged = merge({"starting": part("starting", endpoints=[]), "b": part("b", age=1)}, now=NOW)
    assert [e["name"] for e in merged["endpoints"]] == ["gpu-1"]


def test_the_breaker_shown_is_the_most_cautious_processs_view() -> None:
    trial = ep(
        healthy=False, breaker="half_open", failing_since=NOW - 90, failing_reason="connection refused"
    )
    out = ep(healthy=False, breaker="open", failing_since=NOW - 60, failing_reason="connect timeout")
    parts = {"a": part("a", endpoints=[trial]), "b": part("b", age=1, endpoints=[out])}
    (row,) = merge(parts, now=NOW)["endpoints"]
    assert row["breaker"] == "open" and row["failing_since"] == NOW - 90  # the outage's start
    (row,) = merge({"a": part("a", endpoints=[trial]), "c": part("c", age=1)}, now=NOW)["endpoints"]
    assert row["breaker"] == "half_open"
    (row,) = merge({"c": part("c")}, now=NOW)["endpoints"]
    assert row["breaker"] == "closed"  # a part from before the breaker existed: closed


def test_clients_are_the_newest_database_read_plus_every_pending_part_and_slots_summed() -> None:
    def with_clients(
        name: str, read_at: float, db: list[list[Any]], pending: list[list[Any]], active: dict
    ) -> Any:
        snap: dict[str, Any] = dict(part(name))
        snap["client_parts"] = {"db_read_at": read_at, "db": db, "pending": pending, "active": active}
        return snap

    merged = merge(
        {
            "a": with_clients("a", NOW - 1, [["team", 100, 50, 3, 0]], [["team", 1, 2, 1, 0]], {"team": 2}),
            "b": with_clients(
                "b",
                NOW - 5,
                [["team", 90, 40, 2, 0]],
                [["operator", 5, 5, 1, 0]],
                {"team": 1, "anonymous": 1},
            ),
        },
        now=NOW,
    )
    assert merged["clients"] == [
        {"client": "anonymous", "active": 1, "input": 0, "output": 0, "total": 0},
        {"client": "operator", "active": 0, "input": 5, "output": 5, "total": 10},
        {"client": "team", "active": 3, "input": 101, "output": 52, "total": 153},
    ]
    assert merge({"old": part("old", age=60)}, now=NOW)["clients"] == []
