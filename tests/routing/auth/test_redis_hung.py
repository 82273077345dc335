"""A Redis that accepts connections and never answers (routing/core/outage.py): after
one call times out, quota admissions, cluster claims and usage reads take their fallback at
once for RETRY_AFTER seconds instead of each waiting for its own timeout; then Redis is asked
again."""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Iterator

import pytest

from routing.auth import quota_redis
from routing.auth.principal import Principal
from routing.auth.quotas import Quotas
from routing.core import outage
from routing.core import redis as core_redis
from routing.engine.cluster import ClusterSlots


@pytest.fixture
def hung_redis(settings, monkeypatch) -> Iterator[list[int]]:
    """REDIS_URL points at a socket that completes connections and never answers; each call
    times out after 0.2 s. Yields the count of Redis clients asked for (one per call)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)  # never accepted: the handshake completes in the backlog, no reply ever
    settings.REDIS_URL = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    monkeypatch.setattr(core_redis, "SOCKET_TIMEOUT", 0.2)
    monkeypatch.setattr(outage, "RETRY_AFTER", 5.0)  # the product's own (tests/routing/auth/conftest.py)
    asked: list[int] = []
    real = core_redis.async_client

    def counting():
        asked.append(1)
        return real()

    monkeypatch.setattr(core_redis, "async_client", counting)
    yield asked
    listener.close()


def key(**limits: int) -> Principal:
    return Principal("k", "key", limits=tuple(limits.items()), key_id=random.randrange(1, 2**40))


@pytest.mark.asyncio
async def test_after_one_timeout_admissions_and_usage_fall_back_at_once(hung_redis, monkeypatch, caplog):
    scripts: list[int] = []  # admission script calls
    real_evalsha = quota_redis._evalsha

    async def counting_evalsha(client, keys, args):
        scripts.append(1)
        return await real_evalsha(client, keys, args)

    monkeypatch.setattr(quota_redis, "_evalsha", counting_evalsha)
    q = Quotas()
    reads: list[int] = []  # usage reads from Redis
    real_usage = q.redis.usage

    async def counting_usage(key_id, now):
        reads.append(1)
        return await real_usage(key_id, now)

    monkeypatch.setattr(q.redis, "usage", counting_usage)
    p = key(rpm=100)
    with caplog.at_level(logging.WARNING, logger="routing.quotas"):
        admitted = [await q.admit(p) for _ in range(10)]  # the first waits 0.2 s, the others not
        used = await q.usage(p)
    assert scripts == [1]  # one call, which timed out; nine fell back without asking
    assert reads == []  # suspended: answered from this process's counters at once
    assert used.requests_minute == 10
    assert all(a.headers["x-ratelimit-limit-requests"] == "100" for a in admitted)
    assert sum(1 for r in caplog.records if "could not check quotas" in r.message) == 1
    for a in admitted:
        a.release()


@pytest.mark.asyncio
async def test_after_one_timeout_cluster_claims_use_the_local_limit_at_once(hung_redis):
    slots = ClusterSlots()
    assert await slots.claim("http://gpu:11434", "llama3:latest", 4) == ""  # timed out: local only
    asked = len(hung_redis)
    for _ in range(5):
        assert await slots.claim("http://gpu:11434", "llama3:latest", 4) == ""
    assert len(hung_redis) == asked  # not asked again while suspended


@pytest.mark.asyncio
async def test_redis_is_asked_again_after_retry_after(hung_redis, monkeypatch):
    monkeypatch.setattr(outage, "RETRY_AFTER", 0.0)
    slots = ClusterSlots()
    for _ in range(3):
        assert await slots.claim("http://gpu:11434", "llama3:latest", 4) == ""
    assert len(hung_redis) == 3  # with no suspension, every claim asks (and times out)
