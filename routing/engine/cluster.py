"""Slot limits across several router processes, kept in Redis.

The board enforces `max_concurrent_connections` inside one process. With REDIS_URL set,
several processes share the servers, so each slot is also claimed in Redis: one sorted
set per (endpoint, model) whose members are the slots held anywhere, scored by when
their lease runs out. A Lua script drops expired members, checks the count against the
limit and adds the claim in one step, so two processes never both take the last slot.
Holders renew their leases every few seconds; a process that dies loses its slots when
its leases expire (LEASE seconds) instead of holding them for ever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from django.conf import settings

from routing.core import redis
from routing.core.outage import Outage

log = logging.getLogger("routing.cluster")

LEASE = 15.0  # seconds a claim lives without renewal
RENEW_EVERY = 5.0
PREFIX = "nomyo:slots"
_claims = Outage(log, "could not claim cluster slots in Redis; using the local limits only", redis.suspension)
_frees = Outage(
    log, f"could not free cluster slots in Redis; their leases expire in {LEASE:g} s", redis.suspension
)
_renewals = Outage(log, "could not renew cluster slot leases", redis.suspension)

# KEYS[1] = the slot set; ARGV = now, expiry, member, limit
_CLAIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[1], 3600)
  return 1
end
return 0
"""


class ClusterSlots:
    def __init__(self) -> None:
        self._held: dict[str, str] = {}  # member -> key, renewed while held
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def enabled() -> bool:
        return bool(settings.REDIS_URL)

    @staticmethod
    def key(endpoint_url: str, model: str) -> str:
        # By url, not id: every process agrees on it even right after an admin change.
        return f"{PREFIX}:{endpoint_url}:{model}"

    async def claim(self, endpoint_url: str, model: str, limit: int) -> str | None:
        """A member name when a slot was free across the cluster, else None."""
        if _claims.suspended():  # Redis timed out a moment ago: the local limit only, at once
            return ""
        key = self.key(endpoint_url, model)
        member = f"{self.owner}:{uuid.uuid4().hex[:12]}"
        now = time.time()
        try:
            ok = await redis.async_client().eval(_CLAIM, 1, key, now, now + LEASE, member, limit)
        except Exception as exc:
            # Redis unreachable: fall back to this process's own limit rather than stall.
            _claims.failed(exc)
            return ""
        _claims.ok()
        if not ok:
            return None
        self._held[member] = key
        self._ensure_renewer()
        return member

    def free(self, member: str) -> None:
        """Synchronous, safe in `finally`: forgets the claim now, tells Redis in the background."""
        key = self._held.pop(member, None)
        if key is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._zrem(key, member))
        except RuntimeError:
            return  # no loop: the lease expires by itself
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _zrem(self, key: str, member: str) -> None:
        try:
            await redis.async_client().zrem(key, member)
        except Exception as exc:
            _frees.failed(exc)
        else:
            _frees.ok()

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            renewing = redis.keep_renewed(self._held, RENEW_EVERY, LEASE, _renewals)
            self._renewer = asyncio.get_running_loop().create_task(renewing)

    def held(self) -> int:
        return len(self._held)


cluster = ClusterSlots()
