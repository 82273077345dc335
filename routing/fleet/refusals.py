"""Endpoints known to refuse the fields the router adds on its own (OpenAI `stream_options`)."""

from __future__ import annotations

from routing.observability.locks import TimedLock


class AddedFieldRefusals:
    """Endpoints known to refuse the fields the router adds (one lock; no I/O under it).
    Forgotten when the endpoint changes (caches.invalidate_endpoint calls `forget`)."""

    def __init__(self) -> None:
        self._lock = TimedLock("refusals")
        self._ids: set[int] = set()

    def add(self, endpoint_id: int) -> None:
        with self._lock:
            self._ids.add(endpoint_id)

    def __contains__(self, endpoint_id: int) -> bool:
        return endpoint_id in self._ids  # a set membership test is atomic: no lock needed

    def forget(self, endpoint_id: int | None = None) -> None:
        with self._lock:
            if endpoint_id is None:
                self._ids.clear()
            else:
                self._ids.discard(endpoint_id)


refusals = AddedFieldRefusals()
