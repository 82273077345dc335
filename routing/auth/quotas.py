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

Without REDIS_URL the counters live in this process (`LocalCounters`, one lock, held for a few
dict operations). With it they are shared by every router process (`RedisCounters`): one Lua
script checks every limit, the key generation (routing/auth/client_keys.py) and counts the
request in one atomic step, for every admission asked for in one turn of the event loop at once
(one round trip for all of them; an admission whose request is cancelled meanwhile gives its
place back); concurrency places (taken only for a key with a concurrency limit)
are members of a sorted set scored by lease expiry (like the cluster slots,
routing/engine/cluster.py), so a process that dies loses its places after LEASE seconds. A
place given back is not a round trip of its own: it rides on this process's next admission
(the script removes the places first, then checks), or, when no admission comes within
RELEASE_EVERY seconds, goes in one pipeline with the others given back meanwhile. So this
process sees its own releases at once; other processes may see a place taken up to
RELEASE_EVERY seconds after its request ended, and refuse (never admit) because of it: the
limit is never passed. Token charges are gathered for CHARGE_EVERY seconds and written as
INCRBY with an expiry past the window's end, one pipeline for all keys (so a token limit may be
passed by what is charged in that moment, as it may by the request that crosses it). The
script is sent once and then called by its SHA-1 (EVALSHA). If Redis is unreachable, the
request is admitted on this process's own counters rather than refused.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from routing.auth.principal import Principal
from routing.core import redis
from routing.core.errors import ApiError
from routing.observability.locks import TimedLock

log = logging.getLogger("routing.quotas")

LEASE = 900.0  # seconds a concurrency place lives in Redis (a dead process's places expire)
CHARGE_EVERY = 0.1  # seconds token charges are gathered before one pipelined write to Redis
RELEASE_EVERY = 0.02  # seconds a given-back place waits for an admission to ride on, at most
PREFIX = "nomyo:quota"
CONCURRENCY_RETRY_AFTER = 1  # seconds


class QuotaExceeded(ApiError):
    """A 429 for one of `principal`'s limits; `limit` names it (rpm, tpm, concurrency,
    daily_tokens, monthly_tokens); `ratelimit`: its x-ratelimit-* headers, which the lean handler
    adds to OpenAI replies only. `principal` names the refused key in the access log."""

    def __init__(
        self,
        principal: Principal,
        limit: str,
        message: str,
        *,
        code: str,
        retry_after: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(429, message, code=code, retry_after=retry_after)
        self.principal = principal
        self.limit = limit
        self.ratelimit = headers


class StaleKeys(Exception):
    """Redis says the client keys changed since this process loaded them: reload, authenticate again."""


@dataclass(frozen=True, slots=True)
class Windows:
    """The current UTC windows of `now` (UNIX seconds) and the seconds left in each."""

    minute: int
    day: int
    month: int
    minute_left: float
    day_left: float
    month_left: float

    @classmethod
    def at(cls, now: float) -> Windows:
        """The windows of `now`; within one second the same object (the seconds left are counted
        from the second's start, so they are at most 1 s long: Retry-After is whole seconds)."""
        global _windows
        second = int(now)
        cached = _windows
        if cached is not None and cached[0] == second:
            return cached[1]
        w = cls.compute(float(second))
        _windows = (second, w)
        return w

    @classmethod
    def compute(cls, now: float) -> Windows:
        tm = time.gmtime(now)
        days_in_month = calendar.monthrange(tm.tm_year, tm.tm_mon)[1]
        month_start = calendar.timegm((tm.tm_year, tm.tm_mon, 1, 0, 0, 0))
        return cls(
            minute=int(now // 60),
            day=int(now // 86400),
            month=tm.tm_year * 12 + tm.tm_mon - 1,
            minute_left=60 - now % 60,
            day_left=86400 - now % 86400,
            month_left=month_start + days_in_month * 86400 - now,
        )


_windows: tuple[int, Windows] | None = None  # the windows of the latest second asked (hot-path cache)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a key used: requests and tokens this minute, tokens today and this month, requests in flight."""

    requests_minute: int = 0
    tokens_minute: int = 0
    tokens_day: int = 0
    tokens_month: int = 0
    concurrent: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "requests_this_minute": self.requests_minute,
            "tokens_this_minute": self.tokens_minute,
            "tokens_today": self.tokens_day,
            "tokens_this_month": self.tokens_month,
            "concurrent_requests": self.concurrent,
        }


class Admission:
    """An admitted request. `headers`: OpenAI-style x-ratelimit-* for the reply (empty without
    rpm/tpm; built when first read). `release()` gives back the concurrency place; idempotent,
    synchronous."""

    __slots__ = ("_after", "_headers", "_release")

    def __init__(
        self,
        after: tuple[Principal, Usage, Windows] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self._after = after  # the usage with this request counted, for the headers
        self._headers: dict[str, str] | None = None
        self._release = release

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = ratelimit_headers(*self._after) if self._after is not None else {}
        return self._headers

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


NOTHING_TAKEN = Admission()


def _reset(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s"."""
    s = max(1, int(seconds + 0.999))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60}s"


def ratelimit_headers(principal: Principal, used: Usage, w: Windows) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} (OpenAI's rate limit headers) for the
    limits the key has: requests per minute (rpm) and tokens per minute (tpm)."""
    headers: dict[str, str] = {}
    rpm = principal.limit("rpm")
    if rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - used.requests_minute))
        headers["x-ratelimit-reset-requests"] = _reset(w.minute_left)
    tpm = principal.limit("tpm")
    if tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - used.tokens_minute))
        headers["x-ratelimit-reset-tokens"] = _reset(w.minute_left)
    return headers


def refusal(principal: Principal, used: Usage, w: Windows) -> QuotaExceeded | None:
    """The 429 for `used` (before this request) against the key's limits, or None. Checked in the
    order: concurrency, requests per minute, tokens per minute, per day, per month."""
    limit = principal.limit
    name = principal.name
    if (n := limit("concurrency")) is not None and used.concurrent >= n:
        message = f"the key '{name}' has {n} requests in flight, its limit; retry when one ends"
        return QuotaExceeded(
            principal,
            "concurrency",
            message,
            code="rate_limit_exceeded",
            retry_after=CONCURRENCY_RETRY_AFTER,
            headers=ratelimit_headers(principal, used, w),
        )
    checks = (
        ("rpm", used.requests_minute, w.minute_left, "requests per minute", "rate_limit_exceeded"),
        ("tpm", used.tokens_minute, w.minute_left, "tokens per minute", "rate_limit_exceeded"),
        ("daily_tokens", used.tokens_day, w.day_left, "tokens per day", "insufficient_quota"),
        ("monthly_tokens", used.tokens_month, w.month_left, "tokens per month", "insufficient_quota"),
    )
    for quota, value, left, what, code in checks:
        if (n := limit(quota)) is not None and value >= n:
            message = f"the key '{name}' reached its limit of {n} {what}; retry in {int(left + 0.999)} s"
            return QuotaExceeded(
                principal,
                quota,
                message,
                code=code,
                retry_after=max(1, int(left + 0.999)),
                headers=ratelimit_headers(principal, used, w),
            )
    return None


class LocalCounters:
    """In-process counters by key id. One lock; each window's count is (window id, value) and
    starts again at zero when the window id changes."""

    def __init__(self) -> None:
        self._lock = TimedLock("quotas")
        self._counts: dict[tuple[int, str], tuple[int, int]] = {}  # (key id, kind) -> (window, value)
        self._concurrent: dict[int, int] = {}

    def _get(self, key_id: int, kind: str, window: int) -> int:
        got = self._counts.get((key_id, kind))
        return got[1] if got is not None and got[0] == window else 0

    def _add(self, key_id: int, kind: str, window: int, amount: int) -> None:
        self._counts[(key_id, kind)] = (window, self._get(key_id, kind, window) + amount)

    def _usage(self, key_id: int, w: Windows) -> Usage:
        return Usage(
            self._get(key_id, "req", w.minute),
            self._get(key_id, "tok", w.minute),
            self._get(key_id, "day", w.day),
            self._get(key_id, "month", w.month),
            self._concurrent.get(key_id, 0),
        )

    def admit(self, principal: Principal, now: float) -> Admission:
        w = Windows.at(now)
        key_id = principal.key_id
        with self._lock:
            used = self._usage(key_id, w)
            refused = refusal(principal, used, w)
            if refused is None:
                self._add(key_id, "req", w.minute, 1)
                self._concurrent[key_id] = used.concurrent + 1
        if refused is not None:
            raise refused
        after = Usage(used.requests_minute + 1, used.tokens_minute, used.tokens_day, used.tokens_month)
        return Admission((principal, after, w), lambda: self._leave(key_id))

    def _leave(self, key_id: int) -> None:
        with self._lock:
            left = self._concurrent.get(key_id, 0) - 1
            if left > 0:
                self._concurrent[key_id] = left
            else:
                self._concurrent.pop(key_id, None)

    def charge(self, key_id: int, tokens: int, now: float) -> None:
        w = Windows.at(now)
        with self._lock:
            self._add(key_id, "tok", w.minute, tokens)
            self._add(key_id, "day", w.day, tokens)
            self._add(key_id, "month", w.month, tokens)

    def usage(self, key_id: int, now: float) -> Usage:
        with self._lock:
            return self._usage(key_id, Windows.at(now))

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self._concurrent.clear()


# One call admits every request asked for in one turn of the event loop, in order (two of one
# key see each other's count), after removing the places given back.
# KEYS: the generation; then 5 per admission: requests/minute, tokens/minute, tokens/day,
#       tokens/month, concurrency set; then the concurrency set of each place given back
# ARGV: number of admissions, now, lease, minute ttl; then 7 per admission: known generation
#       ('' skips the check), rpm, tpm, daily, monthly, concurrency (0: none), member; then
#       the member of each place given back
# Returns 6 numbers per admission: status, then requests, tokens this minute, day, month and
# places in flight before it; status 0 admitted (counted), 1 refused (nothing counted), -1 stale
# keys (nothing counted).
_ADMIT = """
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
for j = 1, #KEYS - 1 - 5 * n do redis.call('ZREM', KEYS[1 + 5 * n + j], ARGV[4 + 7 * n + j]) end
local generation = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {}
for a = 0, n - 1 do
  local k = 1 + 5 * a
  local v = 4 + 7 * a
  if ARGV[v + 1] ~= '' and generation ~= tonumber(ARGV[v + 1]) then
    for _, x in ipairs({-1, 0, 0, 0, 0, 0}) do out[#out + 1] = x end
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
    local used = {
      tonumber(redis.call('GET', KEYS[k + 1]) or '0'), tonumber(redis.call('GET', KEYS[k + 2]) or '0'),
      tonumber(redis.call('GET', KEYS[k + 3]) or '0'), tonumber(redis.call('GET', KEYS[k + 4]) or '0'),
      redis.call('ZCARD', KEYS[k + 5])}
    local status = 0
    for i = 1, 5 do
      local limit = tonumber(ARGV[v + 1 + i])
      if limit > 0 and used[i] >= limit then status = 1 end
    end
    if status == 0 then
      redis.call('INCR', KEYS[k + 1])
      redis.call('EXPIRE', KEYS[k + 1], ttl)
      if tonumber(ARGV[v + 6]) > 0 then
        redis.call('ZADD', KEYS[k + 5], now + lease, ARGV[v + 7])
        redis.call('EXPIRE', KEYS[k + 5], math.ceil(lease) + 60)
      end
    end
    out[#out + 1] = status
    for i = 1, 5 do out[#out + 1] = used[i] end
  end
end
return out
"""
_ADMIT_SHA = hashlib.sha1(_ADMIT.encode()).hexdigest()  # Redis names a script by its SHA-1


@dataclass(slots=True)
class _Ask:
    """One admission waiting for the next call to Redis: its 5 keys and 7 arguments as sent, its
    concurrency place (set name and member; None: the key has no concurrency limit), its reply
    (6 numbers, or the error of the call)."""

    keys: tuple[bytes, ...]
    args: tuple[bytes, ...]
    place: tuple[bytes, bytes] | None
    reply: asyncio.Future[list[int]]


LIMITS_SENT = ("rpm", "tpm", "daily_tokens", "monthly_tokens", "concurrency")  # the script's order


class RedisCounters:
    """The same counters in Redis, shared by every router process (see the module docstring).
    The admissions asked for and the places given back wait in lists touched only from the event
    loop's thread (no lock: nothing else reads them)."""

    def __init__(self) -> None:
        self._background: set[asyncio.Task[None]] = set()
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._serial = itertools.count()
        self._charges: dict[int, int] = {}  # key id -> tokens not written yet
        self._asks: list[_Ask] = []  # admissions of this turn of the loop, not sent yet
        self._freed: list[tuple[bytes, bytes]] = []  # concurrency places given back, not sent yet
        # key id -> (principal, minute, its key names, its limits), encoded as sent: encoding
        # about 16 arguments per request was a third of the Redis path's CPU
        self._encoded: dict[int, tuple[Principal, int, tuple[bytes, ...], tuple[bytes, ...]]] = {}
        self._freeing: asyncio.Task[None] | None = None
        self._charging: asyncio.Task[None] | None = None

    @staticmethod
    def keys(key_id: int, w: Windows) -> list[str]:
        base = f"{PREFIX}:{key_id}"
        return [
            f"{base}:req:{w.minute}",
            f"{base}:tok:{w.minute}",
            f"{base}:day:{w.day}",
            f"{base}:month:{w.month}",
            f"{base}:inflight",
        ]

    async def admit(self, principal: Principal, now: float, generation: int | None) -> Admission | None:
        """The admission, or None when Redis could not be asked (the caller falls back). The
        admissions asked for in one turn of the loop go to Redis in one call, with the places
        given back since the last one."""
        w = Windows.at(now)
        keys, limits = self._encode(principal, w)
        member = f"{self.owner}:{next(self._serial)}".encode()
        loop = asyncio.get_running_loop()
        place = (keys[4], member) if limits[4] != b"0" else None
        known = b"" if generation is None else str(generation).encode()
        ask = _Ask(keys, (known, *limits, member), place, loop.create_future())
        self._asks.append(ask)
        if len(self._asks) == 1:
            loop.call_soon(self._send_asks)
        try:
            status, *values = await ask.reply  # cancelled: `_send` gives back a place taken for it
        except Exception:
            log.warning("could not check quotas in Redis; using this process's counters", exc_info=True)
            return None
        if status == -1:
            raise StaleKeys()
        used = Usage(*values)
        if status == 1:
            refused = refusal(principal, used, w)
            if refused is None:  # the counts moved between the script and now: say which was hit
                refused = QuotaExceeded(
                    principal,
                    "concurrency",
                    "over a limit; retry",
                    code="rate_limit_exceeded",
                    retry_after=1,
                    headers={},
                )
            raise refused
        after = Usage(used.requests_minute + 1, used.tokens_minute, used.tokens_day, used.tokens_month)
        if place is None:
            return Admission((principal, after, w))  # no place taken: nothing to give back
        return Admission((principal, after, w), lambda: self._free(*place))

    def _encode(self, principal: Principal, w: Windows) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """The key's 5 key names in the windows `w` and its limits in LIMITS_SENT order (0: none),
        as bytes; the same until the minute or the principal (reloaded keys) changes."""
        cached = self._encoded.get(principal.key_id)
        if cached is not None and cached[0] is principal and cached[1] == w.minute:
            return cached[2], cached[3]
        names = tuple(name.encode() for name in self.keys(principal.key_id, w))
        limits = tuple(str(principal.limit(name) or 0).encode() for name in LIMITS_SENT)
        self._encoded[principal.key_id] = (principal, w.minute, names, limits)
        return names, limits

    def _send_asks(self) -> None:
        asks, self._asks = self._asks, []
        freed, self._freed = self._freed, []
        task = asyncio.get_running_loop().create_task(self._send(asks, freed))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, asks: list[_Ask], freed: list[tuple[bytes, bytes]]) -> None:
        """One call for `asks` and the places `freed`; each ask gets its 6 numbers or the error. An
        ask whose request went away meanwhile gives back the place it was given."""
        from routing.auth.client_keys import REDIS_GENERATION

        keys: list[bytes | str] = [REDIS_GENERATION]
        args: list[object] = [len(asks), time.time(), LEASE, 120]
        for ask in asks:
            keys += ask.keys
            args += ask.args
        keys += (key for key, _ in freed)
        args += (member for _, member in freed)
        try:
            got = [int(v) for v in await _evalsha(redis.async_client(), keys, args)]
        except Exception as exc:
            if freed:  # perhaps not removed: sent again (removing twice is harmless)
                self._freed[:0] = freed
                self._free_later()
            for ask in asks:
                if not ask.reply.done():
                    ask.reply.set_exception(exc)
            return
        for i, ask in enumerate(asks):
            reply = got[6 * i : 6 * i + 6]
            if not ask.reply.done():
                ask.reply.set_result(reply)
            elif reply[0] == 0 and ask.place is not None:  # admitted, nobody waiting: give it back
                self._free(*ask.place)

    def _free(self, key: bytes, member: bytes) -> None:
        """Give a concurrency place back: it goes to Redis with the next admission, or with the
        others given back within RELEASE_EVERY seconds, in one pipeline."""
        self._freed.append((key, member))
        self._free_later()

    def _free_later(self) -> None:
        if self._freeing is None or self._freeing.done():
            try:
                self._freeing = asyncio.get_running_loop().create_task(self._free_soon())
            except RuntimeError:
                self._freed.clear()  # no loop: the leases expire by themselves
                return
            self._background.add(self._freeing)
            self._freeing.add_done_callback(self._background.discard)

    async def _free_soon(self) -> None:
        await asyncio.sleep(RELEASE_EVERY)
        freed, self._freed = self._freed, []
        if not freed:  # every one went with an admission
            return
        try:
            pipe = redis.async_client().pipeline(transaction=False)
            for key, member in freed:
                pipe.zrem(key, member)
            await pipe.execute()
        except Exception:
            log.warning(
                "could not free %d concurrency places in Redis; they expire in %ss", len(freed), LEASE
            )

    def charge(self, key_id: int, tokens: int, now: float) -> None:
        """Add `tokens` to the key's windows in Redis: gathered for CHARGE_EVERY seconds, then
        written for every key in one pipeline (one round trip per batch, not per request)."""
        self._charges[key_id] = self._charges.get(key_id, 0) + tokens
        if self._charging is None or self._charging.done():
            try:
                self._charging = asyncio.get_running_loop().create_task(self._charge_soon())
            except RuntimeError:
                self._charges.clear()  # no loop (a test's thread): nothing can be sent
                return
            self._background.add(self._charging)
            self._charging.add_done_callback(self._background.discard)

    async def _charge_soon(self) -> None:
        await asyncio.sleep(CHARGE_EVERY)
        charges, self._charges = self._charges, {}
        w = Windows.at(time.time())
        ttls = (120, int(w.day_left) + 3600, int(w.month_left) + 3600)
        try:
            pipe = redis.async_client().pipeline(transaction=False)
            for key_id, tokens in charges.items():
                for key, ttl in zip(self.keys(key_id, w)[1:4], ttls, strict=True):
                    pipe.incrby(key, tokens)
                    pipe.expire(key, ttl)
            await pipe.execute()
        except Exception:
            log.warning("could not charge tokens of %d keys in Redis", len(charges), exc_info=True)

    async def usage(self, key_id: int, now: float) -> Usage:
        """The key's usage in Redis, after the places this process gave back (sent first)."""
        w = Windows.at(now)
        keys = self.keys(key_id, w)
        freed, self._freed = self._freed, []
        pipe = redis.async_client().pipeline(transaction=False)
        for place, member in freed:
            pipe.zrem(place, member)
        for key in keys[:4]:
            pipe.get(key)
        pipe.zcount(keys[4], now, "+inf")
        try:
            got = await pipe.execute()
        except Exception:
            self._freed[:0] = freed
            self._free_later()
            raise
        return Usage(*(int(v or 0) for v in got[len(freed) :]))

    async def drained(self) -> None:
        """Wait for the background charges and releases (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


async def _evalsha(client: Any, keys: list[bytes | str], args: list[object]) -> Any:
    """The admission script by its SHA-1; loaded first when this Redis does not know it yet."""
    from redis.exceptions import NoScriptError

    try:
        return await client.evalsha(_ADMIT_SHA, len(keys), *keys, *args)
    except NoScriptError:
        await client.script_load(_ADMIT)
        return await client.evalsha(_ADMIT_SHA, len(keys), *keys, *args)


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
        return self.local.admit(principal, now)

    def charge(self, principal: Principal, tokens: int) -> None:
        """Count `tokens` (prompt + completion) against the key's minute, day and month."""
        if principal.kind != "key" or tokens <= 0:
            return
        now = time.time()
        if settings.REDIS_URL:
            self.redis.charge(principal.key_id, tokens, now)
        else:
            self.local.charge(principal.key_id, tokens, now)

    async def usage(self, principal: Principal) -> Usage:
        """What the key used in the current windows (zeros for the operator and anonymous)."""
        if principal.kind != "key":
            return Usage()
        now = time.time()
        if settings.REDIS_URL:
            try:
                return await self.redis.usage(principal.key_id, now)
            except Exception:
                log.warning("could not read usage from Redis", exc_info=True)
        return self.local.usage(principal.key_id, now)

    def usage_sync(self, principal: Principal) -> Usage:
        """`usage` for threads without a loop (the admin): Redis through a blocking client."""
        if principal.kind != "key":
            return Usage()
        now = time.time()
        if settings.REDIS_URL:
            keys = RedisCounters.keys(principal.key_id, Windows.at(now))
            try:
                pipe = redis.sync_client().pipeline(transaction=False)
                for key in keys[:4]:
                    pipe.get(key)
                pipe.zcount(keys[4], now, "+inf")
                return Usage(*(int(v or 0) for v in pipe.execute()))
            except Exception:
                log.warning("could not read usage from Redis", exc_info=True)
        return self.local.usage(principal.key_id, now)


class QuotaSink:
    """The accounting sink (routing/engine/accounting.py's AccountingSink) that charges real usage."""

    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas

    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Any, *, requested: str = ""
    ) -> None:
        self._quotas.charge(principal, int(counts.prompt) + int(counts.completion))

    def incomplete(self, principal: Principal, endpoint: str, model: str, *, requested: str = "") -> None:
        """A request without counts charges no tokens (it was counted by `admit`)."""


quotas = Quotas()
quota_sink = QuotaSink(quotas)
