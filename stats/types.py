"""The shapes of the usage snapshots the statistics side builds, publishes, merges and serves,
as TypedDicts over routing's fleet snapshot (routing/status/types.py).

Flow: stats.snapshot.build() -> UsageSnapshot (/api/usage); the publisher adds this process's
token parts -> UsagePart (channel-layer group "usage", SSE subscribers); the page's consumer
merges the live parts -> MergedSnapshot (websocket); /api/usage-stream sends UsageEvent.
Token numbers are counts of tokens; `endpoint` in token rows is the endpoint's url (NOMYO
Router's key), `model` the model key. The JSON on the wire is exactly these keys.
"""

# No `from __future__ import annotations`: TypedDict reads NotRequired at class creation, and
# tests compare __required_keys__/__optional_keys__ with what the code builds.
from typing import Literal, NotRequired, TypedDict

from routing.status.types import ActiveRow, BreakerState, EndpointState, FleetSnapshot


class TokenRow(TypedDict):
    endpoint: str  # url
    model: str
    input: int
    output: int
    total: int


# (url, model, input, output, requests, incomplete): an array on the wire (a list once it has
# crossed a channel layer that serialises to JSON or msgpack).
TokenPartRow = tuple[str, str, int, int, int, int]


class TokenParts(TypedDict):
    """One process's token numbers: the database totals at its last read (db_read_at, Unix
    seconds) and its own counts not in that read yet."""

    db_read_at: float
    db: list[TokenPartRow]
    pending: list[TokenPartRow]


# (client, input, output, requests, incomplete): an array on the wire, as TokenPartRow.
ClientPartRow = tuple[str, int, int, int, int]


class ClientParts(TypedDict):
    """One process's numbers by client (the principal's name: a client key's name, "anonymous" or
    "operator"): token totals as TokenParts, and the slots each client holds now."""

    db_read_at: float
    db: list[ClientPartRow]
    pending: list[ClientPartRow]
    active: dict[str, int]


class ClientRow(TypedDict):
    """One client on the page: slots held now over every process, tokens all time."""

    client: str
    active: int
    input: int
    output: int
    total: int


class UsageSnapshot(FleetSnapshot):
    """stats.snapshot.build(): the fleet snapshot with this process's live token totals."""

    tokens: list[TokenRow]  # sorted by (url, model)


class UsagePart(UsageSnapshot):
    """What one process publishes (publisher.publish_now)."""

    token_parts: TokenParts
    client_parts: ClientParts


class MergedSnapshot(TypedDict):
    """stats.merge.merge(): every live process's part in one, as the page shows it."""

    type: Literal["usage.snapshot"]
    taken_at: float
    processes: int  # live processes merged
    endpoints: list[EndpointState]
    active: list[ActiveRow]
    tokens: list[TokenRow]
    queued: dict[str, int]
    clients: list[ClientRow]  # by name


class NomyoUsage(TypedDict):
    """NOMYO Router's /api/usage body: {url: {model: active requests}} and {url: {model: tokens}}."""

    usage_counts: dict[str, dict[str, int]]
    token_usage_counts: dict[str, dict[str, int]]


class UsageEvent(UsageSnapshot, NomyoUsage):
    """One /api/usage-stream event: a snapshot with NOMYO Router's two maps added."""

    token_parts: NotRequired[TokenParts]  # present on published parts, absent on the first event
    client_parts: NotRequired[ClientParts]  # the same


class ConfigEndpoint(TypedDict):
    """One row of /api/config: NOMYO Router's keys (url, status, version) first."""

    url: str
    status: Literal["ok", "error", "disabled"]
    version: str | None
    id: int
    name: str
    kind: str
    enabled: bool
    limit: int
    tier: int
    weight: int
    healthy: bool
    failing_since: float | None
    breaker: BreakerState
    detail: NotRequired[str | None]  # why not ok: the breaker's reason, or "state unknown"
