"""The context sizes servers told the router, per (endpoint id, backend model name), in tokens.

Learned from a server's "prompt too long" error (llama.cpp's `n_ctx`, vLLM's "maximum context
length is N tokens"), so that later conversations for that server and model are trimmed before
they are sent (routing/protocols/common/recovery.py). One lock, held for a dict operation, never
across I/O; an endpoint's entries are forgotten when it changes (caches.invalidate_endpoint).
"""

from __future__ import annotations

from routing.observability.locks import TimedLock


class ContextLimits:
    def __init__(self) -> None:
        self._lock = TimedLock("context_limits")
        self._limits: dict[tuple[int, str], int] = {}

    def learn(self, endpoint_id: int, model: str, n_ctx: int) -> None:
        """Remember `n_ctx` (> 0 tokens) for the server's model; the latest word wins."""
        if n_ctx <= 0:
            return
        with self._lock:
            self._limits[(endpoint_id, model)] = n_ctx

    def get(self, endpoint_id: int, model: str) -> int | None:
        """The context size in tokens, or None when the server never said."""
        return self._limits.get((endpoint_id, model))  # a dict read is atomic: no lock needed

    def snapshot(self) -> dict[tuple[int, str], int]:
        """A copy: (endpoint id, backend model name) -> context size in tokens."""
        with self._lock:
            return dict(self._limits)

    def forget(self, endpoint_id: int | None = None) -> None:
        """Forget one endpoint's sizes (it changed), or all of them (None: tests)."""
        with self._lock:
            if endpoint_id is None:
                self._limits.clear()
            else:
                for key in [k for k in self._limits if k[0] == endpoint_id]:
                    del self._limits[key]


context_limits = ContextLimits()
