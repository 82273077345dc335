"""The shared parts of client keys' limits: windows, usage, the 429, admissions, and the in-process
counters (routing/auth/quotas.py is the front; routing/auth/quota_redis.py the Redis counters).

Windows are fixed and in UTC: the current minute, day and month (the counts restart at each
boundary; Retry-After is the time to that boundary). Only principals of kind "key" are counted.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass

from routing.auth.principal import Principal
from routing.core.errors import ApiError
from routing.observability.locks import TimedLock

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


_ANTHROPIC_NAMES = {
    "x-ratelimit-limit-requests": "anthropic-ratelimit-requests-limit",
    "x-ratelimit-remaining-requests": "anthropic-ratelimit-requests-remaining",
    "x-ratelimit-reset-requests": "anthropic-ratelimit-requests-reset",
    "x-ratelimit-limit-tokens": "anthropic-ratelimit-tokens-limit",
    "x-ratelimit-remaining-tokens": "anthropic-ratelimit-tokens-remaining",
    "x-ratelimit-reset-tokens": "anthropic-ratelimit-tokens-reset",
}


def anthropic_ratelimit_headers(openai: dict[str, str], now: float) -> dict[str, str]:
    """`ratelimit_headers` under Anthropic's names for the Messages API replies:
    anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}, whose reset is the RFC 3339
    UTC time the limit is refilled (the next UTC minute here; Anthropic's API reference, rate
    limits, response headers). `now`: UNIX seconds."""
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((int(now) // 60 + 1) * 60))
    return {
        _ANTHROPIC_NAMES[name]: reset if name.startswith("x-ratelimit-reset") else value
        for name, value in openai.items()
        if name in _ANTHROPIC_NAMES
    }


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
