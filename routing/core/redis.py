"""The Redis clients of the router, from settings.REDIS_URL (only used when it is set).

`async_client()`: one redis.asyncio client per running event loop and URL, shared by the
quota counters (routing/auth/quotas.py) and the cluster slots (routing/engine/cluster.py). An
asyncio client's connections belong to the loop that opened them, so a client is never shared
between loops; it is dropped with its loop (weak reference).
`sync_client()`: one blocking client per URL for threads without a loop (key reloads, the
admin, management commands); its connection pool is thread-safe.
`suspension`: shared by the callers' Outages (routing/core/outage.py): after a call
timed out, Redis is not asked for a few seconds and every caller takes its fallback at once.
`renew()`: pushes the expiry of members of sorted sets scored by their expiry (the cluster
slots' claims, the quota places), which is how both let the holdings of a dead process expire;
`keep_renewed()`: the loop both run while they hold any.

Both use the same timeouts: SOCKET_TIMEOUT seconds to connect and for each reply, so a Redis
that stops answering fails a call quickly (the callers fall back to this process's own limits).
redis-py is imported only when a client is first asked for.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from django.conf import settings

from routing.core.outage import Outage, Suspension

SOCKET_TIMEOUT = 2.0  # seconds, to connect and to wait for each reply
suspension = Suspension()  # when a call to Redis last timed out (routing/core/outage.py)

_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = weakref.WeakKeyDictionary()
_sync: dict[str, Any] = {}
_sync_lock = threading.Lock()


def async_client() -> Any:
    """The redis.asyncio.Redis of the running loop for settings.REDIS_URL (created on first use).
    Raises RuntimeError outside a running loop."""
    loop = asyncio.get_running_loop()
    url = settings.REDIS_URL
    by_url = _async.get(loop)
    if by_url is None:
        by_url = _async[loop] = {}
    client = by_url.get(url)
    if client is None:
        import redis.asyncio as aioredis  # only with REDIS_URL

        client = by_url[url] = aioredis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
        )
    return client


def sync_client() -> Any:
    """The blocking redis.Redis for settings.REDIS_URL (created on first use, then shared)."""
    url = settings.REDIS_URL
    client = _sync.get(url)
    if client is None:
        import redis  # only with REDIS_URL

        with _sync_lock:
            client = _sync.get(url)
            if client is None:
                client = _sync[url] = redis.Redis.from_url(
                    url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
                )
    return client


async def renew(members: Mapping[Any, Any], expiry: float) -> None:
    """Set the score of each member (member -> the sorted set it is in; str or bytes) to `expiry`
    (UNIX s), in one pipeline of one ZADD XX per set: a member removed meanwhile is not added
    back. Raises what Redis raised, or CancelledError when cancelled (redis-py may turn a
    cancellation during a call into another error)."""
    by_set: dict[Any, dict[Any, float]] = {}
    for member, key in members.items():
        by_set.setdefault(key, {})[member] = expiry
    try:
        pipe = async_client().pipeline(transaction=False)
        for key, scored in by_set.items():
            pipe.zadd(key, scored, xx=True)
        await pipe.execute()
    except Exception:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError() from None
        raise


async def keep_renewed(members: Mapping[Any, Any], every: float, lease: float, outage: Outage) -> None:
    """While `members` (the caller's live map: member -> its sorted set) is not empty: every
    `every` seconds, push their expiry `lease` seconds ahead (`renew`). A failure goes to
    `outage` (logged once until a renewal succeeds) and the next round tries again; a member not
    renewed for `lease` seconds expires in Redis."""
    while members:
        await asyncio.sleep(every)
        if not members:
            return
        try:
            await renew(dict(members), time.time() + lease)
        except Exception as exc:
            outage.failed(exc)
        else:
            outage.ok()
