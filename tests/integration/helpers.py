"""Small readers of the router's live state, over HTTP."""

from __future__ import annotations

import re

import httpx

_IN_FLIGHT = re.compile(r"^router_in_flight\{[^}]*\} (\d+)$", re.M)
_QUEUED = re.compile(r"^router_queued\{[^}]*\} (\d+)$", re.M)


def in_flight(url: str) -> int:
    """Slots held right now, summed over endpoints and models."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(int(n) for n in _IN_FLIGHT.findall(text))


def queued(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(int(n) for n in _QUEUED.findall(text))
