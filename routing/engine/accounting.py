"""Token accounting of finished requests: the counts a reply reported, and the sinks they go to.

The forwarding path (routing/engine/proxy.py) reports every finished, counted request exactly
once to `sinks`: `record` when the reply reported its counts, `incomplete` when it did not (none
reported, cut off, first-byte timeout). Sinks are installed at start-up (`AppConfig.ready`):
routing installs `metrics_sink` (Prometheus token counters), stats installs its recorder; a quota
sink would be one more `install()`. routing never imports a sink's module.

Invariants: the sink tuple is replaced whole by install/uninstall and read without a lock on the
hot path; a sink that raises is logged and the next one still runs, so accounting never breaks a
reply and one sink never starves another.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from routing.auth.principal import Principal
from routing.observability import metrics

log = logging.getLogger("routing.accounting")


@dataclass(frozen=True, slots=True)
class Counts:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class AccountingSink(Protocol):
    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Counts, *, requested: str = ""
    ) -> None:
        """A finished request whose reply reported counts (endpoint: its url; model: the key of
        the real model that served it; requested: the key the client asked for when it was
        another, an alias or the origin of a fallback, else ""). Synchronous and cheap: called
        from a `finally` on the event loop."""

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        """A finished request without counts: one request, no tokens invented. estimate: the
        tokens it is estimated to have used, 0 for none known: the records (NDJSON lines, SSE
        events) a cut stream relayed, about one per completion token; the prompt's length / 4
        for a reply that never reports usage (Ollama's legacy /api/embeddings). Statistics do not
        count it as tokens; the quota sink charges it (routing/auth/quotas.py)."""


class Sinks:
    """The installed sinks, in install order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: tuple[AccountingSink, ...] = ()

    def install(self, sink: AccountingSink) -> None:
        """Add a sink (start-up only); installing the same one again changes nothing."""
        with self._lock:
            if sink not in self._sinks:
                self._sinks = (*self._sinks, sink)

    def uninstall(self, sink: AccountingSink) -> None:
        with self._lock:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    @property
    def installed(self) -> tuple[AccountingSink, ...]:
        return self._sinks

    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Counts, *, requested: str = ""
    ) -> None:
        for sink in self._sinks:
            try:
                sink.record(principal, endpoint, model, counts, requested=requested)
            except Exception:
                log.exception("accounting sink %r failed to record; the next one still runs", sink)

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        for sink in self._sinks:
            try:
                sink.incomplete(principal, endpoint, model, requested=requested, estimate=estimate)
            except Exception:
                log.exception("accounting sink %r failed to record; the next one still runs", sink)


sinks = Sinks()


class MetricsSink:
    """Token counts into the Prometheus counters (router_tokens_total by endpoint, model, direction;
    router_client_tokens_total by client, direction)."""

    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Counts, *, requested: str = ""
    ) -> None:
        metrics.count_tokens(endpoint, model, counts.prompt, counts.completion)
        metrics.count_client_tokens(principal.name, counts.prompt, counts.completion)

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        pass  # no tokens to count

    def __repr__(self) -> str:
        return "MetricsSink()"


metrics_sink = MetricsSink()
