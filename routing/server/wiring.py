"""Connects routing's owners to each other at start-up: called once from `RoutingConfig.ready`.

The lower layers never import the upper ones; where a lower owner's change must reach an
upper one (the registry reloaded, so the board's limits change), the upper side connects a
receiver to the lower owner's `Signal` here. Installing twice changes nothing (connect is
idempotent).
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.conf import settings

from routing.auth.client_keys import key_store
from routing.auth.quotas import quota_sink, quotas
from routing.engine.accounting import metrics_sink, sinks
from routing.engine.affinity import Affinity
from routing.engine.affinity_shared import shared_affinity
from routing.engine.board import board
from routing.fleet import caches
from routing.fleet.registry import EndpointInfo, registry
from routing.server.lifecycle import lifecycle

log = logging.getLogger("routing.auth")
LAST_USED_EVERY = 30.0  # seconds between writes of the client keys' `last_used`


def _limits_follow(endpoints: tuple[EndpointInfo, ...], changed: tuple[int, ...]) -> None:
    board.apply_endpoints(endpoints)


def _caches_follow(endpoints: tuple[EndpointInfo, ...], changed: tuple[int, ...]) -> None:
    """What this process cached about a changed endpoint (or an id reused after a delete)
    must not outlive the change, whichever process made it."""
    for endpoint_id in changed:
        caches.invalidate_endpoint(endpoint_id)


async def write_last_used() -> None:
    """Write when client keys were last used, every LAST_USED_EVERY seconds and at shutdown
    (a column the admin shows; never written per request)."""
    while True:
        await asyncio.sleep(LAST_USED_EVERY)
        await flush_last_used()


async def flush_last_used() -> None:
    try:
        await sync_to_async(key_store.flush_last_used, thread_sensitive=False)()
    except Exception:
        log.warning("could not write the client keys' last use", exc_info=True)


async def give_back_leases() -> None:
    """At shutdown, with REDIS_URL: what this process leased of client keys' limits goes back."""
    if settings.REDIS_URL:
        await asyncio.wait_for(quotas.redis.drained(), timeout=5)


def install_affinity() -> None:
    """Prompt-cache affinity (ROUTER_AFFINITY, on by default) around the board's current strategy,
    shared through Redis when REDIS_URL is set. Call it after any change of the base strategy."""
    if not settings.ROUTER_AFFINITY or isinstance(board.strategy, Affinity):
        return
    strategy = Affinity(
        board.strategy,
        ttl=settings.ROUTER_AFFINITY_TTL,
        max_entries=settings.ROUTER_AFFINITY_MAX,
        wait=settings.ROUTER_AFFINITY_WAIT,
        share=bool(settings.REDIS_URL),
    )
    board.use(strategy)
    shared_affinity.attach(strategy)


def install() -> None:
    install_affinity()
    sinks.install(metrics_sink)
    sinks.install(quota_sink)  # client keys' token limits, charged with the real usage
    lifecycle.background(write_last_used)
    lifecycle.on_shutdown(flush_last_used)
    lifecycle.on_shutdown(give_back_leases)
    registry.reloaded.connect(_limits_follow)
    registry.reloaded.connect(_caches_follow)
