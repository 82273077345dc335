"""What endpoints are known to refuse: the fields the router adds on its own (OpenAI
`stream_options`), and reranking per model (a llama.cpp server started without `--reranking`
answers 501, a vLLM server whose model is no reranker 404).

Each structure has one lock, held for a set or dict operation, never across I/O. Both are
forgotten when the endpoint changes (caches.invalidate_endpoint calls `forget`)."""

from __future__ import annotations

import time

from django.conf import settings

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


class ModelRefusals:
    """(endpoint id, model key) pairs a server refused a kind of request for (reranking),
    each for ROUTER_MODELS_TTL seconds: a server restarted with the feature is tried again
    once that passed, as when it starts advertising a new model."""

    def __init__(self, name: str) -> None:
        self._lock = TimedLock(f"refusals:{name}")
        self._until: dict[tuple[int, str], float] = {}

    def add(self, endpoint_id: int, model: str) -> None:
        with self._lock:
            self._until[(endpoint_id, model)] = time.monotonic() + settings.ROUTER_MODELS_TTL

    def refuses(self, endpoint_id: int, model: str) -> bool:
        key = (endpoint_id, model)
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return False
            if until <= time.monotonic():
                del self._until[key]
                return False
            return True

    def forget(self, endpoint_id: int | None = None) -> None:
        with self._lock:
            if endpoint_id is None:
                self._until.clear()
            else:
                for key in [k for k in self._until if k[0] == endpoint_id]:
                    del self._until[key]


refusals = AddedFieldRefusals()
rerank_refusals = ModelRefusals("rerank")
