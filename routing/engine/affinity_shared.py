"""Prompt-cache affinity shared by several router processes through Redis (REDIS_URL).

Each process keeps its own memory (routing/engine/affinity.py, under the board's lock); Redis
holds a copy, one string per (model, key): `nomyo:affinity:<model>:<key>` -> endpoint id (ids
are the database's, the same in every process), with the memory's time to live.

- Read-through: before a request asks the board for a slot, a key this process does not know
  is read from Redis (one GET, bounded by READ_TIMEOUT; an error or a timeout is a miss). What
  it finds goes to the strategy's inbox, applied at its next pick.
- Write-behind: after the board's pick, what it remembered anew (a new key, a move, or a refresh
  due: half the ttl since the last write) waits in the strategy's outbox; `flush` writes it in
  one pipelined round trip, in a background task, never awaited by a request and never under a
  lock. One flush runs at a time; what comes meanwhile waits for the next.

Without REDIS_URL (or with affinity off) `enabled` is False and none of this runs.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from django.conf import settings

from routing.engine.affinity import Affinity, memory_key

log = logging.getLogger("routing.affinity")

PREFIX = "nomyo:affinity"
READ_TIMEOUT = 0.25  # seconds a request waits for Redis at most before going on without


def redis_key(key: str) -> str:
    """The Redis key of a memory key (model NUL affinity)."""
    return f"{PREFIX}:{key.replace(chr(0), ':')}"


class SharedAffinity:
    def __init__(self) -> None:
        self.enabled = False
        self._strategy: Affinity | None = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._flushing: asyncio.Task[None] | None = None

    def attach(self, strategy: Affinity | None) -> None:
        """Share `strategy`'s memory (it must have been made with share=True); None: stop."""
        self._strategy = strategy
        self.enabled = strategy is not None and strategy.outbox is not None and bool(settings.REDIS_URL)

    def _client(self) -> Any:
        import redis.asyncio as aioredis  # only with REDIS_URL set

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
            self._clients[loop] = client
        return client

    async def prefetch(self, model: str, affinity: str) -> None:
        """Read the key from Redis when this process does not know it (see the docstring)."""
        strategy = self._strategy
        if strategy is None:
            return
        key = memory_key(model, affinity)
        if strategy.memory.knows(key):
            return
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                value = await self._client().get(redis_key(key))
        except Exception:
            log.debug("could not read an affinity entry from Redis", exc_info=True)
            return
        if value is not None:
            try:
                strategy.inbox.append((key, int(value)))
            except ValueError:
                pass

    def flush(self) -> None:
        """Write the strategy's outbox to Redis in the background (synchronous, cheap)."""
        strategy = self._strategy
        if strategy is None or not strategy.outbox:
            return
        if self._flushing is not None and not self._flushing.done():
            return
        task = asyncio.get_running_loop().create_task(self._write(strategy))
        self._flushing = task

    async def _write(self, strategy: Affinity) -> None:
        outbox = strategy.outbox
        assert outbox is not None
        ttl = max(1, int(strategy.memory.ttl))
        try:
            pipe = self._client().pipeline(transaction=False)
            while outbox:
                key, endpoint = outbox.popleft()
                pipe.set(redis_key(key), endpoint, ex=ttl)
            await pipe.execute()
        except Exception:
            log.warning("could not write affinity entries to Redis", exc_info=True)

    def clear(self) -> None:
        """Forget the clients and the strategy (tests)."""
        self._clients = weakref.WeakKeyDictionary()
        self.attach(None)


shared_affinity = SharedAffinity()
