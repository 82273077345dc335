"""One upstream request for one chosen candidate, and the relay protocol its reply goes through.

Protocol adapters build an `Attempt` per candidate (a `Planner`); the engine sends it and passes
the reply through its `Relay` (streams) or `BodyReader` (whole bodies). An attempt may carry a
`Recover` hook: shown an error the server sent about this request, it answers `Retry` (send this
other body once more on the same server and slot: a trimmed conversation, images dropped) or
`Refuse` (this server cannot serve it: try the next candidate), or None (the client gets the error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from routing.core.errors import ApiError
from routing.engine.accounting import Counts
from routing.fleet.candidates import Candidate


class Relay(Protocol):
    content_type: str

    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...
    def counts(self) -> Counts | None: ...
    def error_chunk(self, message: str) -> bytes: ...


class BodyReader(Protocol):
    """For non-streaming replies: the body the client gets and the counts in it."""

    def __call__(self, body: bytes) -> tuple[bytes, Counts | None]: ...


@dataclass(frozen=True, slots=True)
class Retry:
    """Send `body` instead, on the same server and slot; `headers` go on the client's reply
    (e.g. `X-Router-Trimmed: 3`)."""

    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Refuse:
    """This server cannot serve the request (remembered by the hook's owner): the next
    candidate is tried; `error` is the client's answer when none is left."""

    error: ApiError


# (the attempt, status, error body) of an error reply -> what to do; at most MAX_RECOVERIES
# per attempt. The attempt is passed rather than held, so no reference cycle keeps its body.
Recover = Callable[["Attempt", int, bytes], Retry | Refuse | None]


@dataclass(slots=True)
class Attempt:
    """One upstream request for one chosen candidate."""

    url: str
    body: bytes
    relay: Callable[[], Relay]  # for streaming replies
    read_body: BodyReader  # for whole replies
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    counted: bool = True  # False: nothing is accounted (a reply that is not a model's work)
    # Tokens a whole reply without counts is estimated to have used (accounting.py `incomplete`:
    # charged to a client key's quota, not counted in statistics); 0: none known.
    estimate: int = 0
    # Builds the body without the field(s) the router added on its own (OpenAI
    # `stream_options`), sent instead when the server refuses them; None: nothing added.
    fallback_body: Callable[[], bytes] | None = None
    # Shown the 4xx / 500 / 501 error replies of this request (see the module docstring).
    recover: Recover | None = None
    # Headers for the client's reply (set by the planner or by a Retry).
    reply_headers: dict[str, str] = field(default_factory=dict)


Planner = Callable[[Candidate], Attempt]
