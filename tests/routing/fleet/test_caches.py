"""The TTL caches: freshness, invalidation, coalesced refreshes (routing/fleet/caches.py)."""

from __future__ import annotations

import asyncio

import pytest

from routing.fleet.caches import TTLCache


def cache(ttl: float = 60.0) -> TTLCache[int, str]:
    return TTLCache("test", lambda: ttl)


@pytest.mark.asyncio
async def test_it_coalesces_concurrent_refreshes_of_one_entry():
    calls = 0

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        return "v"

    c = cache()
    results = await asyncio.gather(*(c.get(1, fetch) for _ in range(100)))
    assert results == ["v"] * 100
    assert calls == 1 and c.refreshes == 1


@pytest.mark.asyncio
async def test_it_serves_fresh_entries_without_fetching():
    c = cache()
    c.put(1, "cached")

    async def fetch() -> str:
        raise AssertionError("must not fetch")

    assert await c.get(1, fetch) == "cached"


@pytest.mark.asyncio
async def test_it_drops_stale_entries_and_refetches():
    c = cache(ttl=0.01)
    c.put(1, "old")
    await asyncio.sleep(0.02)
    assert c.peek(1) is None

    async def fetch() -> str:
        return "new"

    assert await c.get(1, fetch) == "new"


@pytest.mark.asyncio
async def test_it_invalidates_one_entry_or_all():
    c = cache()
    c.put(1, "a")
    c.put(2, "b")
    c.invalidate(1)
    assert c.peek(1) is None and c.peek(2) == "b"
    c.invalidate()
    assert c.snapshot() == {}


@pytest.mark.asyncio
async def test_it_shares_a_failed_refresh_with_every_waiter_and_caches_nothing():
    async def fetch() -> str:
        await asyncio.sleep(0.01)
        raise RuntimeError("down")

    c = cache()
    results = await asyncio.gather(*(c.get(1, fetch) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert c.peek(1) is None and c.refreshes == 1


@pytest.mark.asyncio
async def test_it_finishes_a_refresh_when_the_caller_that_started_it_is_cancelled():
    async def fetch() -> str:
        await asyncio.sleep(0.05)
        return "v"

    c = cache()
    first = asyncio.create_task(c.get(1, fetch))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(c.get(1, fetch))
    first.cancel()
    assert await second == "v"
    assert c.peek(1) == "v" and c.refreshes == 1
