"""The shapes of the fleet snapshot (routing/status/snapshot.py) as TypedDicts.

These are the JSON objects the live page, the merge of several processes (stats/merge.py) and
the NOMYO Router-compatible usage API (stats/api_views.py) read; the JSON on the wire is exactly
these keys. Times are Unix seconds (float); `id`/`endpoint_id` are the database ids of
routing.models.Endpoint. Token numbers are not routing's: stats/types.py extends these.
"""

from __future__ import annotations

from typing import Literal, TypedDict

BreakerState = Literal["closed", "open", "half_open"]  # routing.fleet.breaker.State values


class EndpointState(TypedDict):
    """One configured endpoint as this process sees it. Never its api key."""

    id: int
    name: str
    url: str
    kind: str  # routing.models.Endpoint.kind: "ollama" or "openai"
    enabled: bool
    limit: int  # max concurrent requests per model
    tier: int  # 0 first (routing/engine/selection.py)
    weight: int  # share of the concurrent requests within its tier
    healthy: bool  # breaker closed and the model list answered
    breaker: BreakerState
    failing_since: float | None  # when the breaker left closed; None while closed
    failing_reason: str | None  # the latest evidence against it while out of closed
    version: str | None  # the server's version, when known
    models: list[str]  # model keys it advertises
    loaded: list[str]  # model keys it has loaded (Ollama's /api/ps)
    active: int  # slots held on it, all models


class ActiveRow(TypedDict):
    """Slots held for one (endpoint, model)."""

    endpoint: str  # the endpoint's name (its id when it is no longer configured)
    endpoint_id: int
    model: str  # model key
    count: int


class FleetSnapshot(TypedDict):
    """routing.status.snapshot.build(): one process's view of the fleet right now."""

    type: Literal["usage.snapshot"]
    instance: str  # host:pid of the process that built it
    pid: int
    taken_at: float
    endpoints: list[EndpointState]
    active: list[ActiveRow]  # sorted by (endpoint id, model)
    queued: dict[str, int]  # model key -> requests waiting for a slot
