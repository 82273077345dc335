"""Cross-process control messages over the channel layer: "endpoints changed", "keys changed".

A change of the model aliases or fallback chains is sent as "endpoints changed" with no ids:
the registry reloads them with the endpoints, and no endpoint's caches are dropped.

Every router process listens on the `router.control` group; a change made through any
process (admin, command) reaches all of them, so the next request anywhere sees it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from routing.auth import client_keys, quota_redis
from routing.auth.quotas import quotas
from routing.core import redis
from routing.fleet import caches
from routing.fleet.registry import registry

log = logging.getLogger("routing.control")

GROUP = "router.control"
ORIGIN = f"{os.getpid()}-{id(object())}"
_pending: set[asyncio.Future[None]] = set()  # keeps fire-and-forget sends alive until done


def broadcast_sync(endpoint_ids: list[int] | None) -> None:
    _send({"type": "endpoints.changed", "ids": endpoint_ids, "origin": ORIGIN})


def keys_changed() -> None:
    """A ClientKey was created, changed or deleted (admin, commands; blocking or in a loop): this
    process reloads its key copy before the next request; with REDIS_URL the Redis generation is
    bumped (every process checks it before admitting a keyed request through Redis), the others
    are told, and, called from a thread that may block, it returns once no process can admit
    from a lease under the old keys (routing/auth/quota_redis.py, `confirm_generation`: at once
    normally, FENCE seconds at most)."""
    client_keys.key_store.invalidate()
    generation = None
    if settings.REDIS_URL:
        quotas.redis.close_fast_path()
        try:
            generation = int(redis.sync_client().incr(client_keys.REDIS_GENERATION))
        except Exception:
            log.warning("could not bump the key generation in Redis", exc_info=True)
    _send({"type": "keys.changed", "origin": ORIGIN})
    if generation is not None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a thread that may block (admin, commands): wait for the processes
            try:
                if not quota_redis.confirm_generation(generation):
                    log.warning("a router process did not confirm the key change; its leases closed anyway")
            except Exception:
                log.warning("could not wait for the key change's confirmations", exc_info=True)


def _send(message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            async_to_sync(layer.group_send)(GROUP, message)
        else:
            task = asyncio.ensure_future(layer.group_send(GROUP, message))
            _pending.add(task)
            task.add_done_callback(_pending.discard)
    except Exception:
        log.warning("could not broadcast a change; other processes reload within 5 s")


def apply(message: dict[str, Any]) -> None:
    if message.get("origin") == ORIGIN:
        return
    registry.invalidate()
    ids = message.get("ids")
    if ids is None:
        caches.invalidate_endpoint(None)
    else:
        for endpoint_id in ids:
            caches.invalidate_endpoint(int(endpoint_id))
    registry.refresh_soon()


async def listen() -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    channel = await layer.new_channel()
    await layer.group_add(GROUP, channel)
    try:
        while True:
            try:
                message = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("control channel receive failed; retrying", exc_info=True)
                await asyncio.sleep(2)
                await layer.group_add(GROUP, channel)
                continue
            if message.get("type") == "endpoints.changed":
                apply(message)
            elif message.get("type") == "keys.changed":
                client_keys.key_store.invalidate()
    finally:
        try:
            await layer.group_discard(GROUP, channel)
        except Exception:
            pass
