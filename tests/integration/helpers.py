"""Small readers of the router's live state, over HTTP (/metrics, parsed strictly)."""

from __future__ import annotations

import httpx

from tests.reliability.support import parse_metrics


def _total(url: str, family: str) -> int:
    text = httpx.get(url + "/metrics", timeout=5).text
    return int(sum(s.value for s in parse_metrics(text).find(family)))


def in_flight(url: str) -> int:
    """Slots held right now, summed over endpoints and models."""
    return _total(url, "router_in_flight")


def queued(url: str) -> int:
    """Requests waiting for a slot, summed over models."""
    return _total(url, "router_queued")
