"""Time-limited caches of what each endpoint advertises, has loaded, and which version it runs.

Whether an endpoint is in rotation is not a cache: routing/fleet/breaker.py owns that.

Each cache owns one lock. Freshness is checked and stale entries removed under the lock;
the network fetch happens outside it, in one task per key that every concurrent caller
awaits (so a burst of requests costs the backend one refresh, and a caller that goes
away does not cancel the refresh for the others).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from django.conf import settings

from routing.fleet.breaker import breakers
from routing.fleet.context_limits import context_limits
from routing.fleet.probes import ModelList
from routing.fleet.refusals import refusals, rerank_refusals
from routing.observability.locks import TimedLock

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires: float


class TTLCache(Generic[K, V]):
    def __init__(self, name: str, ttl: Callable[[], float]) -> None:
        self.name = name
        self._ttl = ttl
        self._lock = TimedLock(f"cache:{name}")
        self._entries: dict[K, _Entry[V]] = {}
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self.refreshes = 0  # upstream fetches started, for tests and metrics

    def peek(self, key: K) -> V | None:
        """The fresh value, or None; drops a stale entry on the way."""
        with self._lock:
            return self._fresh(key)

    def expires_in(self, key: K) -> float:
        """Seconds the entry stays fresh (0 when absent or stale)."""
        with self._lock:
            entry = self._entries.get(key)
            return max(0.0, entry.expires - time.monotonic()) if entry is not None else 0.0

    def _fresh(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self._entries[key]
            return None
        return entry.value

    async def get(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        loop = asyncio.get_running_loop()
        with self._lock:
            value = self._fresh(key)
            if value is not None:
                return value
            task = self._join_or_start(key, fetch, loop)
        return await asyncio.shield(task)

    async def refresh(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        """Fetch now even if the entry is fresh (background upkeep); joins a fetch in flight."""
        loop = asyncio.get_running_loop()
        with self._lock:
            task = self._join_or_start(key, fetch, loop)
        return await asyncio.shield(task)

    def _join_or_start(
        self, key: K, fetch: Callable[[], Awaitable[V]], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Task[V]:
        """The fetch in flight for the key, or a new one (lock held)."""
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._refresh(key, fetch))
            self._inflight[key] = task
            self.refreshes += 1
        return task

    async def _refresh(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await fetch()
        finally:
            with self._lock:
                if self._inflight.get(key) is asyncio.current_task():
                    del self._inflight[key]
        self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = _Entry(value, time.monotonic() + self._ttl())

    def invalidate(self, key: K | None = None) -> None:
        with self._lock:
            if key is None:
                self._entries.clear()
            else:
                self._entries.pop(key, None)

    def snapshot(self) -> dict[K, V]:
        """Fresh entries only (for pages and snapshots)."""
        now = time.monotonic()
        with self._lock:
            return {k: e.value for k, e in self._entries.items() if e.expires > now}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._inflight.clear()
            self.refreshes = 0


def _setting(name: str) -> Callable[[], float]:
    def read() -> float:
        return float(getattr(settings, name))

    return read


# endpoint id -> advertised models (/api/tags or /models)
advertised: TTLCache[int, ModelList] = TTLCache("advertised", _setting("ROUTER_MODELS_TTL"))
# endpoint id -> loaded models (/api/ps); OpenAI-compatible servers report none
loaded: TTLCache[int, ModelList] = TTLCache("loaded", _setting("ROUTER_LOADED_TTL"))
# endpoint id -> version string reported by the server
versions: TTLCache[int, str] = TTLCache("versions", _setting("ROUTER_MODELS_TTL"))


def invalidate_endpoint(endpoint_id: int | None = None) -> None:
    """Forget everything cached about one endpoint (or all): called when it changes."""
    for cache in (advertised, loaded, versions):
        cache.invalidate(endpoint_id)
    breakers.forget(endpoint_id)
    refusals.forget(endpoint_id)
    rerank_refusals.forget(endpoint_id)
    context_limits.forget(endpoint_id)


def clear_all() -> None:
    for cache in (advertised, loaded, versions):
        cache.clear()
    breakers.forget()
    refusals.forget(None)
    rerank_refusals.forget(None)
    context_limits.forget(None)
