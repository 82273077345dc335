"""Limits of client keys (routing/auth/quotas.py), in process and in Redis: each limit refuses with
429 and a Retry-After, counts restart with their window, concurrency places come back."""

from __future__ import annotations

import asyncio
import random
import time
from calendar import timegm

import pytest

from routing.auth import quota_redis
from routing.auth import quotas as quotas_module
from routing.auth.principal import ANONYMOUS, OPERATOR, Principal
from routing.auth.quotas import QuotaExceeded, Quotas, StaleKeys, Usage, Windows
from routing.core.errors import ApiError
from routing.engine.accounting import Counts
from tests.integration.test_cluster import _redis_answers

REDIS = "redis://127.0.0.1:6379/15"


def key(**limits: int) -> Principal:
    return Principal("k", "key", limits=tuple(limits.items()), key_id=random.randrange(1, 2**40))


@pytest.fixture(params=["local", "redis"])
def quotas(request, settings) -> Quotas:
    if request.param == "redis":
        if not _redis_answers():
            pytest.skip("no Redis at 127.0.0.1:6379")
        settings.REDIS_URL = REDIS
    else:
        settings.REDIS_URL = ""
    return Quotas()


async def settle(q: Quotas) -> None:
    await q.redis.drained()


def test_windows_are_utc_minute_day_and_month():
    now = timegm((2026, 2, 28, 23, 59, 30))
    w = Windows.at(now)
    assert w.minute_left == 30 and w.day_left == 30 and w.month_left == 30
    assert Windows.at(now + 30).month == w.month + 1 and Windows.at(now + 30).day == w.day + 1


@pytest.mark.asyncio
async def test_operator_and_anonymous_are_never_limited_nor_counted(quotas: Quotas):
    for principal in (ANONYMOUS, OPERATOR):
        for _ in range(50):
            (await quotas.admit(principal)).release()
        quotas.charge(principal, 10**9)
        assert await quotas.usage(principal) == Usage()


@pytest.mark.asyncio
async def test_requests_per_minute(quotas: Quotas):
    p = key(rpm=3)
    admitted = [await quotas.admit(p) for _ in range(3)]
    assert admitted[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert admitted[0].headers["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(ApiError) as refused:
        await quotas.admit(p)
    err = refused.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert err.retry_after is not None and 1 <= err.retry_after <= 60
    assert "3 requests per minute" in err.message
    assert isinstance(err, QuotaExceeded) and err.ratelimit["x-ratelimit-remaining-requests"] == "0"
    for a in admitted:
        a.release()
    assert (await quotas.usage(p)).requests_minute == 3  # refused requests are not counted


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "limit,field",
    [
        ("tpm", "tokens per minute"),
        ("daily_tokens", "tokens per day"),
        ("monthly_tokens", "tokens per month"),
    ],
)
async def test_token_limits_are_checked_before_and_charged_after(quotas: Quotas, limit: str, field: str):
    p = key(**{limit: 100})
    (await quotas.admit(p)).release()  # something left: admitted
    quotas_module.QuotaSink(quotas).record(p, "http://e", "m", Counts(60, 39))
    await settle(quotas)
    (await quotas.admit(p)).release()  # 99 of 100 used: still something left
    quotas_module.QuotaSink(quotas).record(p, "http://e", "m", Counts(1, 0))
    await settle(quotas)
    with pytest.raises(ApiError) as refused:
        await quotas.admit(p)
    assert refused.value.status == 429 and field in refused.value.message
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    used = await quotas.usage(p)
    assert used.tokens_minute == used.tokens_day == used.tokens_month == 100


@pytest.mark.asyncio
@pytest.mark.parametrize("limit", ["tpm", "daily_tokens"])
async def test_one_client_in_sequence_is_refused_after_the_request_that_crosses_a_token_limit(
    quotas: Quotas, limit: str
):
    """Each reply's tokens are charged before the next request, with no pause: with Redis too,
    this process's charges not written yet count (the third request crosses 50, the fourth is
    refused), and the headers say what is left."""
    p = key(**{limit: 50})
    seen = []
    for _ in range(6):
        try:
            admitted = await quotas.admit(p)
        except QuotaExceeded as refused:
            assert refused.limit == limit
            seen.append("429")
            continue
        seen.append(admitted.headers.get("x-ratelimit-remaining-tokens", "200"))
        admitted.release()
        quotas_module.QuotaSink(quotas).record(p, "http://e", "m", Counts(20, 2))
    assert seen == (["50", "28", "6"] if limit == "tpm" else ["200"] * 3) + ["429"] * 3
    await settle(quotas)
    used = await quotas.usage(p)
    assert used.tokens_minute == used.tokens_day == 66


@pytest.mark.asyncio
async def test_concurrency_places_come_back_on_release(quotas: Quotas):
    p = key(concurrency=2)
    first, second = await quotas.admit(p), await quotas.admit(p)
    with pytest.raises(ApiError) as refused:
        await quotas.admit(p)
    assert refused.value.status == 429 and refused.value.retry_after == 1
    assert (await quotas.usage(p)).concurrent == 2
    first.release()
    first.release()  # idempotent: gives back one place only
    await settle(quotas)
    third = await quotas.admit(p)
    with pytest.raises(ApiError):
        await quotas.admit(p)
    second.release()
    third.release()
    await settle(quotas)
    assert (await quotas.usage(p)).concurrent == 0


@pytest.mark.asyncio
async def test_concurrent_admissions_never_exceed_the_limit(quotas: Quotas):
    p = key(concurrency=3, rpm=1000)

    async def one() -> bool:
        try:
            await quotas.admit(p)
        except ApiError:
            return False
        return True

    results = await asyncio.gather(*(one() for _ in range(30)))
    assert sum(results) == 3


@pytest.mark.asyncio
async def test_counts_restart_with_the_minute(quotas: Quotas, monkeypatch):
    p = key(rpm=1)
    now = [float(timegm((2026, 3, 1, 12, 0, 59)))]
    monkeypatch.setattr(quotas_module.time, "time", lambda: now[0])
    (await quotas.admit(p)).release()
    with pytest.raises(ApiError) as refused:
        await quotas.admit(p)
    assert refused.value.retry_after == 1
    now[0] += 1.5
    (await quotas.admit(p)).release()


@pytest.mark.asyncio
async def test_redis_refuses_a_stale_key_generation(settings):
    if not _redis_answers():
        pytest.skip("no Redis at 127.0.0.1:6379")
    settings.REDIS_URL = REDIS
    import redis

    from routing.auth.client_keys import REDIS_GENERATION

    current = int(redis.Redis.from_url(REDIS).get(REDIS_GENERATION) or 0)
    q = Quotas()
    p = key(rpm=5)
    with pytest.raises(StaleKeys):
        await q.admit(p, generation=current - 1)
    assert (await q.usage(p)).requests_minute == 0  # nothing counted
    (await q.admit(p, generation=current)).release()
    assert (await q.usage(p)).requests_minute == 1


@pytest.mark.asyncio
async def test_redis_unreachable_falls_back_to_this_process(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    q = Quotas()
    p = key(rpm=1)
    started = time.monotonic()
    (await q.admit(p)).release()
    with pytest.raises(ApiError):
        await q.admit(p)
    assert time.monotonic() - started < 10


@pytest.fixture
def two_processes(settings) -> tuple[Quotas, Quotas]:
    """Two routers' quota fronts on one Redis (each with its own owner name and pending releases)."""
    if not _redis_answers():
        pytest.skip("no Redis at 127.0.0.1:6379")
    settings.REDIS_URL = REDIS
    return Quotas(), Quotas()


@pytest.mark.asyncio
async def test_redis_a_place_given_back_rides_on_the_next_admission(two_processes, monkeypatch):
    here, there = two_processes
    monkeypatch.setattr(quota_redis, "RELEASE_EVERY", 3600.0)  # no timed flush: only an admission sends it
    p, other = key(concurrency=1), key(rpm=100)
    try:
        (await here.admit(p)).release()
        assert (await there.usage(p)).concurrent == 1  # not sent yet: the other process still counts it
        (await here.admit(other)).release()  # any key's admission carries it
        assert (await there.usage(p)).concurrent == 0
        (await here.admit(p)).release()
        (await here.admit(p)).release()  # this process never waits for its own releases
        assert (await here.usage(p)).concurrent == 0  # reading the usage sends what is pending first
    finally:
        for task in list(here.redis._background):
            task.cancel()
        await here.redis.drained()


@pytest.mark.asyncio
async def test_redis_places_given_back_reach_redis_without_another_admission(two_processes):
    here, there = two_processes
    p = key(concurrency=2)
    first, second = await here.admit(p), await there.admit(p)
    with pytest.raises(ApiError):
        await there.admit(p)
    first.release()
    await settle(here)  # within RELEASE_EVERY, in one pipeline
    assert (await there.usage(p)).concurrent == 1
    (await there.admit(p)).release()
    second.release()
    await settle(there)


@pytest.mark.asyncio
async def test_redis_two_processes_never_exceed_the_concurrency_limit_together(two_processes):
    here, there = two_processes
    p = key(concurrency=3)

    async def one(q: Quotas) -> bool:
        try:
            await q.admit(p)
        except ApiError:
            return False
        return True

    results = await asyncio.gather(*(one(q) for _ in range(15) for q in (here, there)))
    assert sum(results) == 3


@pytest.mark.asyncio
async def test_redis_an_admission_cancelled_on_its_way_gives_its_place_back(two_processes):
    here, there = two_processes
    p = key(concurrency=1)
    asked = asyncio.ensure_future(here.admit(p))
    await asyncio.sleep(0)  # asked: it goes to Redis with the next call, whatever happens to its request
    asked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asked
    await settle(here)
    assert (await there.usage(p)).concurrent == 0
    (await there.admit(p)).release()
    await settle(there)


@pytest.mark.asyncio
async def test_redis_admissions_of_one_turn_are_counted_in_order(two_processes):
    here, _ = two_processes
    p = key(rpm=4)
    results = await asyncio.gather(*(here.admit(p) for _ in range(6)), return_exceptions=True)
    assert [isinstance(r, QuotaExceeded) for r in results] == [False] * 4 + [True] * 2
    assert (await here.usage(p)).requests_minute == 4


@pytest.mark.asyncio
async def test_redis_unreachable_the_fallback_knows_the_tokens_this_process_charged(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    q = Quotas()
    p = key(tpm=100)
    (await q.admit(p)).release()
    q.charge(p, 100)  # the reply's usage: not written to Redis, counted here all the same
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit(p)
    assert refused.value.limit == "tpm"
    q.redis._charges.clear()  # nothing will ever reach a Redis that is not there
    await q.redis.drained()


@pytest.mark.asyncio
async def test_usage_includes_tokens_charged_a_moment_ago(quotas: Quotas):
    p = key(tpm=1000, daily_tokens=10_000)
    (await quotas.admit(p)).release()
    quotas.charge(p, 52)  # with Redis: not written before the next sync tick
    used = await quotas.usage(p)
    assert (used.tokens_minute, used.tokens_day, used.tokens_month) == (52, 52, 52)
    await settle(quotas)
    assert (await quotas.usage(p)).tokens_day == 52  # written once, not counted twice
