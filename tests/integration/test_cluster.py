"""Several router processes sharing one Redis never push a server past its limit together."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.integration.helpers import in_flight

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hello"}]}


def _redis_answers() -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.mark.skipif(not _redis_answers(), reason="no Redis at 127.0.0.1:6379 (CI starts one)")
def test_it_holds_the_limit_across_two_router_processes(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=5, delay=0.01)
    endpoint(fake.url, max_concurrent_connections=2)
    db = str(8 + uuid.uuid4().int % 7)  # a Redis database of its own, away from other tests
    a = router(REDIS_URL=f"redis://127.0.0.1:6379/{db}")
    b = router(REDIS_URL=f"redis://127.0.0.1:6379/{db}")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> int:
                url = (a if i % 2 else b).url
                reply = await client.post(url + "/api/chat", json={**CHAT, "stream": i % 3 == 0})
                return reply.status_code

            return list(await asyncio.gather(*(one(i) for i in range(40))))

    assert asyncio.run(burst()) == [200] * 40
    stats = fake.stats.snapshot()
    assert stats["completed"] == 40
    assert stats["max_in_flight"]["llama3:latest"] == 2  # each process alone would allow 2
    assert in_flight(a.url) == 0 and in_flight(b.url) == 0
