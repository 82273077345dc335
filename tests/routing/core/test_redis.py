"""The router's Redis clients (routing/core/redis.py): one per event loop and URL, one blocking
client per URL, all talking to settings.REDIS_URL."""

from __future__ import annotations

import asyncio

import pytest

from routing.core import redis
from tests.integration.test_cluster import _redis_answers

URL = "redis://127.0.0.1:6379/15"


def test_it_shares_one_async_client_per_loop_and_url(settings):
    settings.REDIS_URL = URL

    async def two_asks() -> tuple[object, object]:
        return redis.async_client(), redis.async_client()

    first, again = asyncio.run(two_asks())
    assert first is again
    other_loop, _ = asyncio.run(two_asks())
    assert other_loop is not first  # a client's connections belong to the loop that opened them

    async def other_url() -> object:
        settings.REDIS_URL = "redis://127.0.0.1:6379/14"
        return redis.async_client()

    async def both() -> tuple[object, object]:
        a = redis.async_client()
        return a, await other_url()

    settings.REDIS_URL = URL
    a, b = asyncio.run(both())
    assert a is not b


def test_the_async_client_needs_a_running_loop(settings):
    settings.REDIS_URL = URL
    with pytest.raises(RuntimeError):
        redis.async_client()


def test_it_shares_one_blocking_client_per_url(settings):
    settings.REDIS_URL = URL
    first = redis.sync_client()
    assert redis.sync_client() is first
    settings.REDIS_URL = "redis://127.0.0.1:6379/14"
    assert redis.sync_client() is not first


@pytest.mark.skipif(not _redis_answers(), reason="no Redis at 127.0.0.1:6379")
def test_both_clients_reach_the_configured_database(settings):
    settings.REDIS_URL = URL
    redis.sync_client().set("nomyo:test:core-redis", "1", ex=30)

    async def read() -> bytes | None:
        value: bytes | None = await redis.async_client().get("nomyo:test:core-redis")
        await redis.async_client().aclose()
        return value

    assert asyncio.run(read()) == b"1"
