"""One upstream request for one chosen candidate, and the relay protocol its reply goes through.

Protocol adapters build an `Attempt` per candidate (a `Planner`); the engine sends it and passes
the reply through its `Relay` (streams) or `BodyReader` (whole bodies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

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
    counted: bool = True  # False for replies that carry no token counts (legacy embeddings)
    # Builds the body without the field(s) the router added on its own (OpenAI
    # `stream_options`), sent instead when the server refuses them; None: nothing added.
    fallback_body: Callable[[], bytes] | None = None


Planner = Callable[[Candidate], Attempt]
