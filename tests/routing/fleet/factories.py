"""Test factories for the fleet's value types (routing/fleet/registry.py `EndpointInfo`,
routing/fleet/candidates.py `Candidate`), so that tests describe an endpoint by what matters to
them (id, limit, tier, weight, kind) and nothing else.

An endpoint `id` is named `ep<id>` and, unless told, lives at http://127.0.0.1:<9000 + id>; no
test here opens that address, it only has to be distinct per id."""

from __future__ import annotations

from routing.fleet.candidates import Candidate
from routing.fleet.registry import EndpointInfo

MODEL = "m:latest"


def endpoint_info(
    id: int,
    *,
    limit: int = 1,
    tier: int = 0,
    weight: int = 1,
    kind: str = "ollama",
    enabled: bool = True,
    url: str | None = None,
) -> EndpointInfo:
    """An enabled endpoint without an API key; `limit` is its concurrent requests per model."""
    return EndpointInfo(
        id=id,
        name=f"ep{id}",
        url=url or f"http://127.0.0.1:{9000 + id}",
        kind=kind,
        api_key="",
        enabled=enabled,
        limit=limit,
        tier=tier,
        weight=weight,
    )


def candidate(
    id: int,
    *,
    model: str = MODEL,
    loaded: bool = False,
    limit: int = 1,
    tier: int = 0,
    weight: int = 1,
    url: str | None = None,
) -> Candidate:
    """`model` on `endpoint_info(id, ...)`, `loaded` when the endpoint has it in memory."""
    return Candidate(endpoint_info(id, limit=limit, tier=tier, weight=weight, url=url), model, loaded)
