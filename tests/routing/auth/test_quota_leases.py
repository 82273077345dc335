"""Leases of the Redis counters (routing/auth/quota_redis.py): most admissions need no round trip,
no limit is passed by two processes together, what a lease did not use goes back, and a key
change closes every process's fast path before `confirm_generation` returns."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from routing.auth import quota_redis
from routing.auth.client_keys import REDIS_GENERATION
from routing.auth.principal import Principal
from routing.auth.quotas import QuotaExceeded, Quotas, StaleKeys
from tests.integration.test_cluster import _redis_answers

REDIS = "redis://127.0.0.1:6379/6"


def key(**limits: int) -> Principal:
    return Principal("k", "key", limits=tuple(limits.items()), key_id=random.randrange(1, 2**40))


@pytest.fixture
def generation(settings) -> int:
    """This Redis's key generation (the fast path needs the caller's copy to carry it)."""
    if not _redis_answers():
        pytest.skip("no Redis at 127.0.0.1:6379")
    settings.REDIS_URL = REDIS
    import redis

    client = redis.Redis.from_url(REDIS)
    client.delete(quota_redis.CONFIRMED)
    return int(client.get(REDIS_GENERATION) or 0)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The number of admissions in each admission script call."""
    seen: list[int] = []
    real = quota_redis._evalsha

    async def counting(client, keys, args):
        seen.append(int(args[0]))
        return await real(client, keys, args)

    monkeypatch.setattr(quota_redis, "_evalsha", counting)
    return seen


async def no_place_left(p: Principal, pause: float = 0.01) -> None:
    """Wait (100 pauses at most) until none of `p`'s concurrency places is left in Redis."""
    import redis

    client = redis.Redis.from_url(REDIS)
    place_set = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))[4]
    for _ in range(100):
        if client.zcard(place_set) == 0:
            break
        await asyncio.sleep(pause)
    assert client.zcard(place_set) == 0


async def open_fast_path(q: Quotas, p: Principal, generation: int) -> None:
    """One admission through Redis starts the sync ticks; the fast path opens at the first."""
    (await q.admit(p, generation)).release()
    for _ in range(100):
        if q.redis.fast_path_open(generation):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the fast path did not open")


@pytest.mark.asyncio
async def test_most_admissions_take_no_round_trip(generation, calls):
    q = Quotas()
    p = key(rpm=10**6, tpm=10**9, daily_tokens=10**9, monthly_tokens=10**9, concurrency=10**5)
    await open_fast_path(q, p, generation)
    calls.clear()
    for _ in range(640):
        admitted = await q.admit(p, generation)
        q.charge(p, 10)
        admitted.release()
    assert sum(calls) <= 640 // quota_redis.LEASE_MAX + 2  # a lease of LEASE_MAX per round trip
    await q.redis.drained()
    used = await q.usage(p)
    assert used.requests_minute == 641  # leased and unused requests went back
    assert used.tokens_minute == used.tokens_day == 6400
    assert used.concurrent == 0


@pytest.mark.asyncio
async def test_a_key_without_rpm_or_concurrency_is_counted_from_its_lease(generation, calls):
    q = Quotas()
    p = key(tpm=10**9)
    await open_fast_path(q, p, generation)
    calls.clear()
    for _ in range(50):
        (await q.admit(p, generation)).release()
    assert sum(calls) <= 1
    await q.redis.drained()
    assert (await q.usage(p)).requests_minute == 51


@pytest.mark.asyncio
async def test_two_processes_with_leases_never_pass_a_limit_and_give_back_what_they_did_not_use(generation):
    here, there = Quotas(), Quotas()
    p = key(rpm=400, concurrency=10**4)
    await open_fast_path(here, p, generation)
    await open_fast_path(there, p, generation)
    admitted = 2

    async def one(q: Quotas) -> bool:
        try:
            (await q.admit(p, generation)).release()
        except QuotaExceeded:
            return False
        return True

    for _ in range(3):  # in bursts, as load comes
        results = await asyncio.gather(*(one(q) for _ in range(100) for q in (here, there)))
        admitted += sum(results)
    assert admitted <= 400
    await here.redis.drained()
    await there.redis.drained()
    assert (await there.usage(p)).requests_minute == admitted  # no lease left counted
    while await one(random.choice((here, there))):  # near the limit each one is exact
        admitted += 1
    assert admitted == 400
    await here.redis.drained()
    await there.redis.drained()


@pytest.mark.asyncio
async def test_leased_places_never_exceed_the_concurrency_limit_across_processes(generation):
    here, there = Quotas(), Quotas()
    limit = 80
    p = key(concurrency=limit)
    await open_fast_path(here, p, generation)
    await open_fast_path(there, p, generation)
    held = []
    for _ in range(3 * limit):
        q = random.choice((here, there))
        try:
            held.append(await q.admit(p, generation))
        except QuotaExceeded:
            pass
    assert len(held) <= limit
    assert (await here.usage(p)).concurrent == len(held)  # held places, not the unused leased ones
    for admission in held:
        admission.release()
    await here.redis.drained()
    await there.redis.drained()
    assert (await here.usage(p)).concurrent == 0


@pytest.mark.asyncio
async def test_a_lease_goes_back_after_its_key_is_idle(generation, monkeypatch):
    monkeypatch.setattr(quota_redis, "LEASE_IDLE", 0.3)
    q = Quotas()
    p = key(rpm=10**6, concurrency=10**4)
    await open_fast_path(q, p, generation)
    (await q.admit(p, generation)).release()
    for _ in range(200):
        if not q.redis._leases:
            break
        await asyncio.sleep(0.01)
    assert not q.redis._leases
    import redis

    client = redis.Redis.from_url(REDIS)
    keys = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))
    for _ in range(100):  # the tick that dropped it sends the returns with it
        if int(client.get(keys[0]) or 0) == 2 and client.zcard(keys[4]) == 0:
            break
        await asyncio.sleep(0.01)
    assert int(client.get(keys[0]) or 0) == 2 and client.zcard(keys[4]) == 0
    await q.redis.drained()


@pytest.mark.asyncio
async def test_tokens_over_a_limit_are_refused_from_the_lease_at_once(generation):
    q = Quotas()
    p = key(tpm=1000, rpm=10**6)
    await open_fast_path(q, p, generation)
    (await q.admit(p, generation)).release()
    q.charge(p, 1000)  # not written to Redis yet: this process knows it all the same
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit(p, generation)
    assert refused.value.limit == "tpm"
    await q.redis.drained()


@pytest.mark.asyncio
@pytest.mark.parametrize("limits", [{"tpm": 1000}, {"daily_tokens": 1000, "rpm": 10**6}])
async def test_one_client_in_sequence_passes_a_token_limit_by_one_request_only(generation, limits):
    """Requests one after another, each charged 22 tokens before the next, through Redis, then
    from a lease once the fast path opens, with ticks writing charges meanwhile: exactly as the
    in-process counters, the request that crosses 1000 (the 46th) completes and the next is
    refused."""
    q = Quotas()
    p = key(**limits)
    admitted = 0
    for _ in range(60):
        try:
            (await q.admit(p, generation)).release()
        except QuotaExceeded:
            break
        admitted += 1
        q.charge(p, 22)
        await asyncio.sleep(0.005)
    assert admitted == 46
    assert q.redis._leases  # the fast path was used too
    await q.redis.drained()
    assert (await q.usage(p)).tokens_day == 46 * 22


def slow_charge_writes(monkeypatch, seconds: float, *, answered: bool) -> asyncio.Event:
    """Hold each pipeline that writes token charges (INCRBY) for `seconds`: before it runs, or,
    with `answered`, after it ran (its answer comes late). The event is set when one is held."""
    from redis.asyncio.client import Pipeline

    real = Pipeline.execute
    held = asyncio.Event()

    async def execute(self, raise_on_error: bool = True):
        writes = any(str(args[0]).upper() == "INCRBY" for args, _ in self.command_stack)
        if writes and not answered:
            held.set()
            await asyncio.sleep(seconds)
        got = await real(self, raise_on_error)
        if writes and answered:
            held.set()
            await asyncio.sleep(seconds)
        return got

    monkeypatch.setattr(Pipeline, "execute", execute)
    return held


@pytest.mark.asyncio
async def test_tokens_a_tick_is_writing_count_in_an_admission_meanwhile(generation, monkeypatch):
    """The tick took the charges and its INCRBY has not run yet: an admission sent meanwhile
    counts them all the same (through Redis, no lease: the fast path is not open yet)."""
    writing = slow_charge_writes(monkeypatch, 0.3, answered=False)
    q = Quotas()
    p = key(tpm=50)
    (await q.admit(p, generation)).release()
    q.charge(p, 60)
    await asyncio.wait_for(writing.wait(), timeout=3)
    assert not q.redis._charges  # taken by the tick, not in Redis yet
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit(p, generation)
    assert refused.value.limit == "tpm"
    await q.redis.drained()
    assert (await q.usage(p)).tokens_minute == 60


@pytest.mark.asyncio
async def test_tokens_a_tick_has_written_but_not_heard_back_from_count_once(generation, monkeypatch):
    """The tick's INCRBY has run in Redis and its answer is on its way: an admission sent then
    waits for it, and counts the charge once (counted in Redis and again as unwritten, a request
    under the limit was refused, and the next one admitted)."""
    answered_late = slow_charge_writes(monkeypatch, 0.2, answered=True)
    q = Quotas()
    p = key(tpm=100)
    (await q.admit(p, generation)).release()
    q.charge(p, 60)
    await asyncio.wait_for(answered_late.wait(), timeout=3)
    admitted = await q.admit(p, generation)  # 60 of 100 used: something is left
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "40"
    admitted.release()
    await q.redis.drained()


@pytest.mark.asyncio
async def test_tokens_charged_while_a_lease_is_asked_for_count_in_the_lease(generation, monkeypatch):
    """A reply's tokens are charged while the admission that brings a new lease is on its way to
    Redis (the script did not see them): the lease counts them, so the next request is refused."""
    q = Quotas()
    p = key(tpm=50, rpm=10**6)
    await open_fast_path(q, p, generation)
    assert p.key_id not in q.redis._leases
    real = quota_redis._evalsha

    async def charged_meanwhile(client, keys, args):
        q.charge(p, 60)
        return await real(client, keys, args)

    monkeypatch.setattr(quota_redis, "_evalsha", charged_meanwhile)
    (await q.admit(p, generation)).release()  # through Redis, with a lease
    monkeypatch.setattr(quota_redis, "_evalsha", real)
    assert q.redis._leases[p.key_id].requests > 0
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit(p, generation)
    assert refused.value.limit == "tpm"
    await q.redis.drained()


def claim(owner: str) -> float:
    """The time until which `owner`'s fast path is open, as its entry in CONFIRMED says."""
    import redis

    value = redis.Redis.from_url(REDIS).hget(quota_redis.CONFIRMED, owner)
    assert isinstance(value, bytes)
    return float(value.decode().split(" ")[1])


async def idle(q: Quotas) -> None:
    """Wait (3 s at most) until `q`'s sync ticks have stopped."""
    for _ in range(300):
        if q.redis._ticker is not None and q.redis._ticker.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the ticks did not stop")


@pytest.mark.asyncio
async def test_a_process_gone_idle_is_not_waited_for_by_a_key_change(generation, monkeypatch):
    """Its ticks stopped, so nothing would confirm a new generation: it closed its fast path and
    said so, and `confirm_generation` returns True (confirmed), not False after FENCE."""
    import redis

    monkeypatch.setattr(quota_redis, "LEASE_IDLE", 0.2)
    q = Quotas()
    p = key(rpm=10**6)
    await open_fast_path(q, p, generation)
    await idle(q)
    bumped = int(redis.Redis.from_url(REDIS).incr(REDIS_GENERATION))
    assert await asyncio.to_thread(quota_redis.confirm_generation, bumped)
    assert claim(q.redis.owner) < time.time() - quota_redis.CLOCK_SKEW  # said closed
    assert not q.redis.fast_path_open(generation)  # and closed
    await open_fast_path(q, p, bumped)  # the next request starts the ticks: open again
    assert claim(q.redis.owner) > time.time()
    await q.redis.drained()


@pytest.mark.asyncio
async def test_a_request_while_the_process_goes_idle_starts_the_ticks_again(generation, monkeypatch):
    monkeypatch.setattr(quota_redis, "LEASE_IDLE", 0.2)
    q = Quotas()
    p = key(rpm=10**6)
    await open_fast_path(q, p, generation)
    real = q.redis._close_claim
    arrived: list[asyncio.Future[Any]] = []

    async def close_claim() -> None:
        if not arrived:  # the request comes while the fast path is closing
            arrived.append(asyncio.ensure_future(q.admit(p, generation)))
        await real()

    monkeypatch.setattr(q.redis, "_close_claim", close_claim)
    for _ in range(300):
        if arrived:
            break
        await asyncio.sleep(0.01)
    (await arrived[0]).release()  # admitted (through Redis: the fast path was closed)
    for _ in range(100):  # the ticks run again and re-open it
        if q.redis.fast_path_open(generation):
            break
        await asyncio.sleep(0.01)
    assert q.redis.fast_path_open(generation)
    assert claim(q.redis.owner) > time.time()
    await q.redis.drained()


@pytest.mark.asyncio
async def test_a_key_change_closes_the_fast_path_in_every_process_before_it_returns(generation):
    import redis

    here, there = Quotas(), Quotas()
    p = key(rpm=10**6, concurrency=10**4)
    await open_fast_path(here, p, generation)
    await open_fast_path(there, p, generation)
    (await there.admit(p, generation)).release()  # from the lease
    client = redis.Redis.from_url(REDIS)
    bumped = int(client.incr(REDIS_GENERATION))
    started = time.monotonic()
    confirmed = await asyncio.to_thread(quota_redis.confirm_generation, bumped)
    assert confirmed and time.monotonic() - started < quota_redis.FENCE  # the ticks confirmed it
    for q in (here, there):  # a copy of the keys from before the change is refused at once
        assert not q.redis.fast_path_open(generation)
        with pytest.raises(StaleKeys):
            await q.admit(p, generation)
    (await here.admit(p, bumped)).release()  # a reloaded copy is admitted
    await here.redis.drained()
    await there.redis.drained()


@pytest.mark.asyncio
async def test_a_process_that_stops_ticking_is_waited_for_until_its_fast_path_has_closed(generation):
    import redis

    q = Quotas()
    p = key(rpm=10**6)
    await open_fast_path(q, p, generation)
    client = redis.Redis.from_url(REDIS)
    bumped = int(client.incr(REDIS_GENERATION))
    started = time.monotonic()
    # The loop is blocked here: no tick runs, so nothing confirms the new generation.
    confirmed = quota_redis.confirm_generation(bumped, timeout=quota_redis.FENCE + 1)
    waited = time.monotonic() - started
    assert not q.redis.fast_path_open(generation)  # closed on its own by the time it returned
    assert 0.5 < waited <= quota_redis.FENCE + 1.5
    assert confirmed  # its claim ran out within FENCE: nobody is left to wait for
    with pytest.raises(StaleKeys):
        await q.admit(p, generation)
    await q.redis.drained()


def fail_after_running(monkeypatch, command: bytes | str, times: int = 1) -> list[int]:
    """Make the next `times` pipelines holding `command` run in Redis, then raise as if the reply
    was lost (a timeout after the commands were sent). Returns the count of such failures."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import TimeoutError as RedisTimeout

    real = Pipeline.execute
    failed: list[int] = []

    async def execute(self, raise_on_error: bool = True):
        names = {str(args[0]).upper() for args, _ in self.command_stack}
        got = await real(self, raise_on_error)
        if str(command).upper() in names and len(failed) < times:
            failed.append(1)
            raise RedisTimeout("reply lost")
        return got

    monkeypatch.setattr(Pipeline, "execute", execute)
    return failed


@pytest.mark.asyncio
async def test_a_tick_whose_reply_was_lost_does_not_give_leased_requests_back_twice(generation, monkeypatch):
    """A give-back (DECRBY) that may have run is not sent again: sent twice, it would uncount
    requests that were admitted, and two processes together would pass the rpm."""
    monkeypatch.setattr(quota_redis, "LEASE_IDLE", 0.3)
    here, there = Quotas(), Quotas()
    rpm = 1024
    p = key(rpm=rpm)
    await open_fast_path(here, p, generation)
    (await here.admit(p, generation)).release()  # through Redis with a lease of LEASE_MAX
    assert here.redis._leases[p.key_id].requests > 50
    failed = fail_after_running(monkeypatch, "DECRBY")
    for _ in range(300):  # idle: the lease goes back, the tick's reply is lost, the next tick runs
        if failed and not here.redis._leases and not here.redis._returns:
            break
        await asyncio.sleep(0.01)
    assert failed and not here.redis._leases
    await here.redis.drained()
    import redis

    client = redis.Redis.from_url(REDIS)
    keys = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))
    assert int(client.get(keys[0]) or 0) == 2  # the two admitted requests, no fewer
    admitted = 2
    for _ in range(rpm + 100):
        try:
            (await there.admit(p, generation)).release()
        except QuotaExceeded:
            break
        admitted += 1
    assert admitted <= rpm
    await there.redis.drained()


def redis_away(monkeypatch) -> None:
    """Every call to Redis from the loop fails (as when it is unreachable) until undone."""
    from redis.exceptions import ConnectionError as RedisDown

    from routing.core import redis as core_redis

    def unreachable():
        raise RedisDown("Redis is away")

    monkeypatch.setattr(core_redis, "async_client", unreachable)


@pytest.mark.asyncio
async def test_places_given_back_while_redis_is_away_are_removed_when_it_is_back(generation, monkeypatch):
    """A place given back during an outage is not left in Redis for LEASE seconds, where it would
    refuse the key's requests in every process after Redis came back."""
    import redis

    q, other = Quotas(), Quotas()
    p = key(concurrency=3)
    held = [await q.admit(p, generation) for _ in range(3)]
    with monkeypatch.context() as away:
        redis_away(away)
        for admission in held:
            admission.release()
        await asyncio.sleep(0.3)  # the release's pipeline and a tick or two fail meanwhile
    client = redis.Redis.from_url(REDIS)
    place_set = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))[4]
    for _ in range(100):  # Redis is back: the places go without waiting for this process's next request
        if client.zcard(place_set) == 0:
            break
        await asyncio.sleep(0.01)
    assert client.zcard(place_set) == 0
    again = [await other.admit(p, generation) for _ in range(3)]  # another process: all 3 free
    for admission in again:
        admission.release()
    await q.redis.drained()
    await other.redis.drained()
    assert client.zcard(place_set) == 0


@pytest.mark.asyncio
async def test_tokens_charged_while_redis_is_away_are_written_when_it_is_back(generation, monkeypatch):
    q = Quotas()
    p = key(tpm=10**6)
    (await q.admit(p, generation)).release()
    with monkeypatch.context() as away:
        redis_away(away)
        q.charge(p, 70)
        await asyncio.sleep(0.35)  # ticks fail meanwhile
    for _ in range(100):
        if not q.redis._charges:
            break
        await asyncio.sleep(0.01)
    await q.redis.drained()
    assert (await q.usage(p)).tokens_minute == 70


@pytest.mark.asyncio
@pytest.mark.parametrize("leased", [False, True])
async def test_a_request_cancelled_as_its_reply_arrives_keeps_nothing(generation, monkeypatch, leased):
    """The reply is set, then the request is cancelled before it runs again (a client gone in
    the same turn of the loop): what the script granted it goes back, its place and any lease."""
    import redis

    q = Quotas()
    p = key(rpm=10**6, concurrency=10**4)
    if leased:
        await open_fast_path(q, p, generation)
        q.redis._leases.clear()  # the next admission asks Redis for a lease
    real = quota_redis._evalsha
    waiting: list[asyncio.Task] = []

    async def reply_then_cancel(client, keys, args):
        got = await real(client, keys, args)
        asyncio.get_running_loop().call_soon(waiting[0].cancel)  # runs before the request's wake-up
        return got

    monkeypatch.setattr(quota_redis, "_evalsha", reply_then_cancel)
    waiting.append(asyncio.ensure_future(q.admit(p, generation)))
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    monkeypatch.setattr(quota_redis, "_evalsha", real)
    await q.redis.drained()
    client = redis.Redis.from_url(REDIS)
    keys = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))
    assert client.zcard(keys[4]) == 0
    assert int(client.get(keys[0]) or 0) == (2 if leased else 1)  # counted, as a request cut short


@pytest.mark.asyncio
@pytest.mark.parametrize("leased", [False, True])
async def test_places_taken_are_given_back_when_the_reply_was_lost(generation, monkeypatch, leased):
    """The script ran but its reply did not come (a timeout): the request is admitted on this
    process's counters, and the places the script took for it (and a lease) go back to Redis
    rather than refusing the key's requests in every process for LEASE seconds."""
    from redis.exceptions import TimeoutError as RedisTimeout

    q = Quotas()
    p = key(concurrency=10**4 if leased else 3)
    if leased:
        await open_fast_path(q, p, generation)
        q.redis._leases.clear()
    real = quota_redis._evalsha

    async def reply_lost(client, keys, args):
        await real(client, keys, args)
        raise RedisTimeout("Timeout reading from socket")

    monkeypatch.setattr(quota_redis, "_evalsha", reply_lost)
    (await q.admit(p, generation)).release()  # admitted on this process's counters
    monkeypatch.setattr(quota_redis, "_evalsha", real)
    await no_place_left(p)
    await q.redis.drained()


@pytest.mark.asyncio
async def test_redis_away_is_logged_once_and_used_again_when_back(generation, monkeypatch, caplog):
    import logging

    import redis

    q = Quotas()
    p = key(rpm=10**6, concurrency=100)
    with monkeypatch.context() as away, caplog.at_level(logging.WARNING, logger="routing.quotas"):
        redis_away(away)
        for _ in range(50):  # admitted on this process's counters
            (await q.admit(p, generation)).release()
        await asyncio.sleep(0.3)
    assert len(caplog.records) <= 2  # one for the admissions, one for the ticks: not one per request
    assert q.local.usage(p.key_id, time.time()).requests_minute == 50
    (await q.admit(p, generation)).release()  # Redis is back: counted there
    await q.redis.drained()
    keys = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))
    client = redis.Redis.from_url(REDIS)
    assert int(client.get(keys[0]) or 0) == 1 and client.zcard(keys[4]) == 0
    caplog.clear()
    with monkeypatch.context() as away, caplog.at_level(logging.WARNING, logger="routing.quotas"):
        redis_away(away)
        (await q.admit(p, generation)).release()
    assert caplog.records  # a new outage is logged again
    await q.redis.drained()


@pytest.mark.asyncio
async def test_a_request_refused_as_stale_is_not_admitted_with_a_copy_from_before_the_change(
    generation, settings, monkeypatch
):
    import threading

    import redis

    from routing.auth import client_keys, keys
    from routing.auth.client_keys import KeyRecord, hash_key, key_store, new_key
    from routing.core.errors import ApiError

    settings.ROUTER_API_KEY = "operator-secret"
    settings.ROUTER_REGISTRY_RELOAD = 10**9
    token = new_key()
    p = Principal("leaving", "key", limits=(("rpm", 10**6),), key_id=random.randrange(1, 2**40))
    key_store._by_hash = {hash_key(token): KeyRecord(p, True, None)}
    key_store.redis_generation = generation
    key_store._loaded_generation = key_store._generation
    key_store._loaded_at = time.monotonic()
    release = threading.Event()

    def stale_load():  # a reload that read the generation and the table before the revocation
        release.wait(5)
        return {hash_key(token): KeyRecord(p, True, None)}, generation

    try:
        redis.Redis.from_url(REDIS).incr(REDIS_GENERATION)  # the revocation: the table says disabled
        request = asyncio.ensure_future(keys.admit_request(f"Bearer {token}", None))
        await asyncio.sleep(0)  # authenticated with the old copy; its admission goes to Redis
        monkeypatch.setattr(client_keys, "load_keys", stale_load)
        key_store.invalidate()  # an earlier change's reload, still reading
        reload = asyncio.ensure_future(key_store.ensure_fresh())
        await asyncio.sleep(0.05)
        release.set()
        await reload
        try:
            (await request)[1].release()
            admitted = True
        except ApiError:
            admitted = False
        assert not admitted
    finally:
        key_store.clear()
        await keys.quotas.redis.drained()


@pytest.mark.asyncio
async def test_drained_cut_short_leaves_no_request_waiting_forever(generation, monkeypatch):
    """Shutdown waits for `drained` a few seconds at most (routing/server/wiring.py): cutting it
    short does not cancel the call a request waits on, which would leave it waiting forever."""
    real = quota_redis._evalsha

    async def slow(client, keys, args):
        await asyncio.sleep(0.3)
        return await real(client, keys, args)

    monkeypatch.setattr(quota_redis, "_evalsha", slow)
    q = Quotas()
    p = key(rpm=100, concurrency=5)
    request = asyncio.ensure_future(q.admit(p, generation))
    await asyncio.sleep(0.05)  # its call to Redis is on its way
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(q.redis.drained(), timeout=0.1)
    (await asyncio.wait_for(request, timeout=3)).release()
    await q.redis.drained()
    assert (await q.usage(p)).concurrent == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(2))
async def test_a_flaky_redis_under_load_leaks_no_place_and_raises_nothing(generation, monkeypatch, seed):
    """Two processes under load while a fifth of the calls to Redis fail, before or after they
    ran, and some requests are cancelled: no error escapes, and once Redis answers again every
    place is back."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import TimeoutError as RedisTimeout

    rnd = random.Random(seed)
    procs = [Quotas(), Quotas()]
    p = key(rpm=10**5, concurrency=40, tpm=10**9)
    for q in procs:
        await open_fast_path(q, p, generation)
    flaky = [True]
    real_eval, real_execute = quota_redis._evalsha, Pipeline.execute

    async def run_flaky(call):
        if flaky[0] and rnd.random() < 0.2:
            if rnd.random() < 0.5:
                raise RedisTimeout("before it ran")
            await call()
            raise RedisTimeout("after it ran")
        return await call()

    async def evalsha(client, keys, args):
        return await run_flaky(lambda: real_eval(client, keys, args))

    async def execute(self, raise_on_error=True):
        return await run_flaky(lambda: real_execute(self, raise_on_error))

    monkeypatch.setattr(quota_redis, "_evalsha", evalsha)
    monkeypatch.setattr(Pipeline, "execute", execute)

    async def one(q: Quotas) -> None:
        try:
            admitted = await q.admit(p, generation)
        except QuotaExceeded:
            return
        try:
            await asyncio.sleep(rnd.random() * 0.02)
            q.charge(p, 10)
        finally:
            admitted.release()

    tasks = []
    for i in range(1500):
        tasks.append(asyncio.ensure_future(one(rnd.choice(procs))))
        if rnd.random() < 0.1:
            await asyncio.sleep(0)
            tasks[-1].cancel()
        if i % 100 == 0:
            await asyncio.sleep(0.05)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert not [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
    flaky[0] = False
    for q in procs:
        await q.redis.drained()
    await no_place_left(p, pause=0.02)


@pytest.mark.asyncio
async def test_leases_are_not_given_back_to_a_redis_that_lost_its_data(generation, monkeypatch):
    """Redis restarted empty (its key generation went back): the leases of this process were
    counted in the data it lost, so giving them back would uncount the requests admitted since,
    and the rpm would be passed by what the leases held."""
    import redis

    client = redis.Redis.from_url(REDIS)
    before = int(client.incr(REDIS_GENERATION))  # a generation a restart can lose
    here, there = Quotas(), Quotas()
    rpm = 1024
    p = key(rpm=rpm)
    await open_fast_path(here, p, before)
    (await here.admit(p, before)).release()  # a lease of 63 requests
    assert here.redis._leases[p.key_id].requests > 50
    keys = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))
    client.delete(keys[0], REDIS_GENERATION)  # the restart: its data is gone
    for _ in range(100):  # a tick sees generation 0 and drops the lease
        if not here.redis._leases and not here.redis._returns:
            break
        await asyncio.sleep(0.01)
    await here.redis.drained()
    assert int(client.get(keys[0]) or 0) >= 0
    admitted = 0
    for _ in range(rpm + 100):  # a process with a copy of the keys loaded after the restart
        try:
            (await there.admit(p, 0)).release()
        except QuotaExceeded:
            break
        admitted += 1
    assert admitted <= rpm
    await there.redis.drained()


def places_alive(p: Principal) -> list[Any]:
    """`p`'s concurrency places in Redis that have not expired (an expired one stays in the set
    until the next admission removes it, and counts for nothing)."""
    import redis

    client = redis.Redis.from_url(REDIS)
    place_set = quota_redis.RedisCounters.keys(p.key_id, quota_redis.Windows.at(time.time()))[4]
    return list(client.zrangebyscore(place_set, time.time(), "+inf"))


@pytest.mark.asyncio
async def test_places_of_a_dead_process_expire_while_a_living_ones_are_renewed(generation, monkeypatch):
    monkeypatch.setattr(quota_redis, "LEASE", 0.6)
    monkeypatch.setattr(quota_redis, "RENEW_EVERY", 0.15)
    living, dead = Quotas(), Quotas()
    p = key(concurrency=2)  # too small to lease: each place is exact
    long_request = await living.admit(p)
    await dead.admit(p)  # never released: its process dies below
    with pytest.raises(QuotaExceeded):
        await living.admit(p)
    renewer = dead.redis._renewer
    assert renewer is not None
    renewer.cancel()  # the dead process renews nothing any more
    await asyncio.sleep(1.5)  # 2.5 lifetimes of a place
    assert len(places_alive(p)) == 1  # the living one's, renewed
    again = await living.admit(p)  # the dead one's place expired: free again
    with pytest.raises(QuotaExceeded):  # the long request's place still counts
        await living.admit(p)
    long_request.release()
    again.release()
    await no_place_left(p)
    await living.redis.drained()
    await asyncio.sleep(0.3)
    assert living.redis._renewer is not None and living.redis._renewer.done()  # nothing left to renew


@pytest.mark.asyncio
async def test_a_leased_place_in_use_is_renewed_after_its_lease_was_dropped(generation, monkeypatch):
    monkeypatch.setattr(quota_redis, "LEASE", 0.6)
    monkeypatch.setattr(quota_redis, "RENEW_EVERY", 0.15)
    monkeypatch.setattr(quota_redis, "LEASE_IDLE", 0.2)
    q = Quotas()
    p = key(concurrency=10**4)
    await open_fast_path(q, p, generation)
    held = await q.admit(p, generation)  # from the lease
    assert q.redis._leases
    await asyncio.sleep(1.5)  # the lease is dropped (idle) and its unused places go back
    assert not q.redis._leases
    assert len(places_alive(p)) == 1  # the one in use, renewed
    held.release()
    await no_place_left(p)
    await q.redis.drained()


@pytest.mark.asyncio
async def test_a_failing_renewal_is_logged_once_and_the_places_renewed_when_redis_answers(
    generation, monkeypatch, caplog
):
    monkeypatch.setattr(quota_redis, "LEASE", 0.8)
    monkeypatch.setattr(quota_redis, "RENEW_EVERY", 0.05)
    real = quota_redis.redis.renew
    failing = {"left": 5}

    async def flaky(members, expiry):
        if failing["left"] > 0:
            failing["left"] -= 1
            raise ConnectionError("Redis away")
        await real(members, expiry)

    monkeypatch.setattr(quota_redis.redis, "renew", flaky)
    q = Quotas()
    p = key(concurrency=2)
    held = await q.admit(p)
    with caplog.at_level("WARNING", logger="routing.quotas"):
        await asyncio.sleep(1.2)  # 5 failed rounds (0.25 s), then renewed past the first expiry
    assert failing["left"] == 0
    warned = [r.message for r in caplog.records]
    once = "could not renew the quota places this process holds (logged once until it works again)"
    assert warned.count(once) == 1
    assert len(places_alive(p)) == 1
    held.release()
    await no_place_left(p)
    await q.redis.drained()
