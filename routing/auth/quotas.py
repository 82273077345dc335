"""Limits of client keys: requests and tokens per minute, concurrent requests, tokens per day and month.

Only principals of kind "key" are counted; the operator and anonymous callers have no limits
and cost nothing here. Windows are fixed and in UTC: the current minute, day and month (the
counts restart at each boundary; Retry-After is the time to that boundary).

Order of one request:
1. `admit(principal)` before forwarding: refuses with ApiError(429) and Retry-After when the
   requests of this minute reached `rpm`, the tokens of this minute/day/month reached `tpm`,
   `daily_tokens` or `monthly_tokens` (token limits are checked as "is anything left?"), or
   `concurrency` requests are in flight. Else it counts the request and takes a concurrency
   place, returned by `Admission.release()` (idempotent, synchronous: every `finally`).
2. `QuotaSink.record` after the reply, with the real usage (the accounting sink seam,
   routing/engine/accounting.py): charges prompt + completion tokens to the three windows.

Without REDIS_URL the counters live in this process (routing/auth/quota_base.py's
`LocalCounters`, one lock held for a few dict operations). With it they are shared by every
router process (routing/auth/quota_redis.py: one atomic script per round trip, with leases so
that most requests need none). If Redis is unreachable, the request is admitted on this
process's own counters rather than refused.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings

from routing.auth.principal import Principal
from routing.auth.quota_base import (
    NOTHING_TAKEN,
    Admission,
    LocalCounters,
    QuotaExceeded,
    StaleKeys,
    Usage,
    Windows,
    anthropic_ratelimit_headers,
    ratelimit_headers,
    refusal,
)
from routing.auth.quota_redis import RedisCounters
from routing.core import redis
from routing.core.outage import Outage
from routing.observability import metrics

__all__ = [
    "NOTHING_TAKEN",
    "Admission",
    "QuotaExceeded",
    "QuotaSink",
    "Quotas",
    "StaleKeys",
    "Usage",
    "Windows",
    "anthropic_ratelimit_headers",
    "quota_sink",
    "quotas",
    "ratelimit_headers",
    "refusal",
]

log = logging.getLogger("routing.quotas")
_usage_reads = Outage(
    log, "could not read usage from Redis; answering from this process's counters", redis.suspension
)
_BY_LOCAL = metrics.quota_admissions.labels("local")


class Quotas:
    """The limits' front: local counters, or Redis ones with REDIS_URL (local when Redis fails)."""

    def __init__(self) -> None:
        self.local = LocalCounters()
        self.redis = RedisCounters()

    async def admit(self, principal: Principal, generation: int | None = None) -> Admission:
        """Admit a request of `principal` or raise ApiError(429); StaleKeys when Redis holds a
        newer key generation than `generation` (the caller reloads the keys and asks again)."""
        if principal.kind != "key":
            return NOTHING_TAKEN
        now = time.time()
        if settings.REDIS_URL:
            admitted = await self.redis.admit(principal, now, generation)
            if admitted is not None:
                return admitted
        admitted = self.local.admit(principal, now)
        _BY_LOCAL.inc()
        return admitted

    def charge(self, principal: Principal, tokens: int) -> None:
        """Count `tokens` (prompt + completion) against the key's minute, day and month. With
        REDIS_URL they are counted in this process too, so that while Redis is away the
        fallback's token limits know at least this process's own use."""
        if principal.kind != "key" or tokens <= 0:
            return
        now = time.time()
        if settings.REDIS_URL:
            self.redis.charge(principal.key_id, tokens, now)
        self.local.charge(principal.key_id, tokens, now)

    async def usage(self, principal: Principal) -> Usage:
        """What the key used in the current windows (zeros for the operator and anonymous)."""
        if principal.kind != "key":
            return Usage()
        now = time.time()
        if settings.REDIS_URL and not _usage_reads.suspended():
            try:
                used = await self.redis.usage(principal.key_id, now)
            except Exception as exc:
                _usage_reads.failed(exc)
            else:
                _usage_reads.ok()
                return used
        return self.local.usage(principal.key_id, now)

    def usage_sync(self, principal: Principal) -> Usage:
        """`usage` for threads without a loop (the admin): Redis through a blocking client."""
        if principal.kind != "key":
            return Usage()
        now = time.time()
        if settings.REDIS_URL and not _usage_reads.suspended():
            keys = RedisCounters.keys(principal.key_id, Windows.at(now))
            try:
                pipe = redis.sync_client().pipeline(transaction=False)
                for key in keys[:4]:
                    pipe.get(key)
                pipe.zcount(keys[4], now, "+inf")
                used = Usage(*(int(v or 0) for v in pipe.execute()))
            except Exception as exc:
                _usage_reads.failed(exc)
            else:
                _usage_reads.ok()
                return used
        return self.local.usage(principal.key_id, now)


class QuotaSink:
    """The accounting sink (routing/engine/accounting.py's AccountingSink) that charges real usage."""

    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas

    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Any, *, requested: str = ""
    ) -> None:
        self._quotas.charge(principal, int(counts.prompt) + int(counts.completion))

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        """A request without counts (cut, or the server reported no usage) was counted by
        `admit`; it is charged the estimate (accounting.py `incomplete`): a stream cut before its
        last event (where the usage comes) is not free, nor is a reply that never reports usage.
        A cut stream's prompt is not estimated (its size in tokens is not known here)."""
        self._quotas.charge(principal, estimate)


quotas = Quotas()
quota_sink = QuotaSink(quotas)
