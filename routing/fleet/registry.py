"""The endpoint registry as the hot path sees it: an in-memory copy of the Endpoint table,
and of the model aliases and fallback chains (routing/fleet/routes.py), loaded together.

Proxied requests never query the database. A change in the admin (or any service call)
bumps the generation; the next request reloads the copy once. After each reload the registry
sends `reloaded(endpoints, changed_ids)` (outside its lock); the wiring connects the board's
limits and the caches to it, so the fleet never imports the engine. Other router processes
learn of the change through the control group (routing/fleet/control.py) or, as a safety net,
by a reload at most ROUTER_REGISTRY_RELOAD seconds old.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from routing.core.events import Signal
from routing.fleet.routes import NONE, ModelRoutes, load_routes
from routing.models import Endpoint
from routing.observability.locks import TimedLock

log = logging.getLogger("routing.registry")


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    id: int
    name: str
    url: str
    kind: str
    api_key: str
    enabled: bool
    limit: int  # max concurrent requests per model
    tier: int = 0  # 0 first (routing/engine/selection.py)
    weight: int = 1  # share of the concurrent requests within its tier, >= 1

    @classmethod
    def of(cls, ep: Endpoint) -> EndpointInfo:
        return cls(
            id=ep.id,
            name=ep.display_name,
            url=ep.url,
            kind=ep.kind,
            api_key=ep.api_key,
            enabled=ep.enabled,
            limit=ep.max_concurrent_connections,
            tier=ep.tier,
            weight=ep.weight,
        )

    @property
    def is_ollama(self) -> bool:
        return self.kind == "ollama"

    @property
    def openai_base(self) -> str:
        """Where this endpoint's OpenAI-compatible routes live."""
        return self.url if not self.is_ollama else self.url + "/v1"


_background: set[asyncio.Task[tuple[EndpointInfo, ...]]] = set()


class Registry:
    def __init__(self) -> None:
        self._lock = TimedLock("registry")
        self._endpoints: tuple[EndpointInfo, ...] = ()
        self._routes: ModelRoutes = NONE
        self._generation = 1
        self._loaded_generation = 0
        self._loaded_at = 0.0
        self._reload: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (the endpoints now, the ids of those that changed or went): sent after each reload.
        self.reloaded: Signal[[tuple[EndpointInfo, ...], tuple[int, ...]]] = Signal("registry.reloaded")

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The server's event loop (the lifecycle binds it at start-up), where
        `refresh_soon_threadsafe` reloads."""
        self._loop = loop

    def invalidate(self) -> None:
        """Thread-safe: called from admin threads and management commands."""
        with self._lock:
            self._generation += 1

    def cached(self) -> tuple[EndpointInfo, ...]:
        with self._lock:
            return self._endpoints

    def _is_fresh(self) -> bool:
        return self._loaded_generation == self._generation and (
            time.monotonic() - self._loaded_at < settings.ROUTER_REGISTRY_RELOAD
        )

    async def all(self) -> tuple[EndpointInfo, ...]:
        with self._lock:
            if self._is_fresh():
                return self._endpoints
            task = self._reload
            if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
                # One reload in flight, whoever asked first; everyone else awaits it.
                task = asyncio.get_running_loop().create_task(self._load(self._generation))
                self._reload = task
        await asyncio.shield(task)
        with self._lock:
            return self._endpoints

    def refresh_soon(self) -> None:
        """Reload in the background (in the running loop), so queued requests see a change."""
        task = asyncio.get_running_loop().create_task(self.all())
        _background.add(task)
        task.add_done_callback(_background.discard)

    def refresh_soon_threadsafe(self) -> None:
        """From any thread (admin, management commands): `refresh_soon` in the server's loop,
        so queued requests see new limits at once. Nothing happens before a loop is bound."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.refresh_soon)

    async def enabled(self) -> tuple[EndpointInfo, ...]:
        return tuple(ep for ep in await self.all() if ep.enabled)

    async def routes(self) -> ModelRoutes:
        """The model aliases and fallback chains, as fresh as the endpoints (same reload)."""
        await self.all()
        return self._routes

    def cached_routes(self) -> ModelRoutes:
        """The routes of the last reload, without reloading (after an `all()` in this request).
        Read without the lock, on every request: the table is immutable and replaced whole
        (under the lock, by `_load` and `clear`), so one attribute read sees a whole table."""
        return self._routes

    async def _load(self, generation: int) -> None:
        try:
            endpoints, routes = await sync_to_async(load_fleet, thread_sensitive=False)()
        except Exception:
            with self._lock:
                if self._loaded_generation == 0:
                    raise  # nothing loaded yet: nothing to route with
                # The database is away: keep routing with the copy we have, retry later.
                self._loaded_generation = generation
                self._loaded_at = time.monotonic()
            log.warning("could not reload the endpoint list; keeping the last one", exc_info=True)
            return
        with self._lock:
            before = {ep.id: ep for ep in self._endpoints}
            self._endpoints = endpoints
            if routes is not None:
                self._routes = routes
            self._loaded_generation = generation
            self._loaded_at = time.monotonic()
        # A change made by another process (or an id reused after a delete) must not
        # leave this process with cached state that belongs to the old endpoint.
        after = {ep.id: ep for ep in endpoints}
        self.reloaded.send(endpoints, tuple(i for i, ep in before.items() if after.get(i) != ep))

    def clear(self) -> None:
        with self._lock:
            self._endpoints = ()
            self._routes = NONE
            self._generation += 1
            self._reload = None


def load_endpoints() -> tuple[EndpointInfo, ...]:
    close_old_connections()
    try:
        return tuple(EndpointInfo.of(ep) for ep in Endpoint.objects.all())
    finally:
        close_old_connections()


def load_fleet() -> tuple[tuple[EndpointInfo, ...], ModelRoutes | None]:
    """The endpoints, then the aliases and chains (None when they could not be read: the
    last ones are kept, as the endpoints are when the database is away). A worker thread."""
    endpoints = load_endpoints()
    close_old_connections()
    try:
        return endpoints, load_routes()
    except Exception:
        log.warning("could not read the aliases and fallback chains; keeping the last ones", exc_info=True)
        return endpoints, None
    finally:
        close_old_connections()


registry = Registry()
