"""Two router processes sharing a Redis channel layer: one page sees the whole fleet.

Both processes publish their part of the usage to the `usage` group; the websocket on
process A merges them. Requests go through process B (and A); the page on A shows
both processes, B's active requests, and the exact sum of the tokens counted by both.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import wait_until
from tests.integration.helpers import in_flight
from tests.stats.live import UsageSocket, active_of, chat, prompt_tokens, staff_session, tokens_of

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
LOCK_KEY = "nomyo-router-tests:lock"
MODEL = "llama3:latest"
PROMPT = "why is the sky blue"


def database_total(base_url: str) -> int:
    """Total tokens as one process reports them: the database plus its unflushed numbers."""
    return int(httpx.get(base_url + "/api/token_counts", timeout=5).json()["total_tokens"])


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of its own for this test: the first of 15..1 whose lock key it
    can set (SET NX with expiry), so concurrent test runs never share the `usage` group."""
    redis = pytest.importorskip("redis")
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(
            f"Redis at {REDIS_HOST}:{REDIS_PORT} does not answer ({exc}); this test needs it (CI runs one)"
        )
    token = uuid.uuid4().hex
    for db in range(15, 0, -1):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=2)
        try:
            claimed = client.set(LOCK_KEY, token, nx=True, ex=900)
        except redis.ResponseError:  # the server has fewer databases
            continue
        if not claimed:
            continue
        try:
            yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
        finally:
            for key in client.scan_iter(match="asgi*"):
                client.delete(key)
            if client.get(LOCK_KEY) == token.encode():
                client.delete(LOCK_KEY)
        return
    pytest.skip("every Redis database 1..15 is claimed by another test run")


def test_a_page_on_one_process_sees_the_usage_of_both(fakes, endpoint, router, redis_url) -> None:
    gpu = fakes(kind="ollama", models=[MODEL], tokens=12, delay=0.15)  # about 1.8 s a reply
    endpoint(gpu.url, name="gpu-1", max_concurrent_connections=4)
    session = staff_session("ops")
    a = router(REDIS_URL=redis_url)
    b = router(REDIS_URL=redis_url)

    ws = UsageSocket(a.url, session)
    try:
        both = ws.wait_for(lambda s: s["processes"] == 2, timeout=10)
        assert active_of(both, "gpu-1") == 0
        assert tokens_of(both, gpu.url, MODEL) == (0, 0, 0)

        # A request on B only: A's page shows it, although A itself holds no slot.
        on_b = chat(b.url, "llama3", PROMPT)
        seen = ws.wait_for(lambda s: active_of(s, "gpu-1") == 1, timeout=10)
        assert in_flight(a.url) == 0 and in_flight(b.url) == 1
        assert seen["processes"] == 2
        assert [(r["endpoint"], r["model"], r["count"]) for r in seen["active"]] == [("gpu-1", MODEL, 1)]

        # And one on A at the same time: the counts add up.
        on_a = chat(a.url, "llama3", PROMPT)
        ws.wait_for(lambda s: active_of(s, "gpu-1") == 2, timeout=10)

        on_b.join()
        on_a.join()
        one = prompt_tokens(PROMPT), 12, prompt_tokens(PROMPT) + 12
        expected = (2 * one[0], 2 * one[1], 2 * one[2])
        ws.wait_for(lambda s: tokens_of(s, gpu.url, MODEL) == expected and active_of(s, "gpu-1") == 0, 15)
        # Once both processes have flushed (and re-read, and published), every snapshot has
        # the exact sum: the newest database read plus what each has not flushed, nothing twice.
        # (Each process answers with the database plus its own unflushed numbers: both
        # answering the sum means each one's numbers are in the database.)
        wait_until(lambda: database_total(a.url) == database_total(b.url) == expected[2], timeout=10)
        time.sleep(0.5)
        later = [ws.next(timeout=5) for _ in range(4)]  # a few heartbeats, over several seconds
        assert [tokens_of(s, gpu.url, MODEL) for s in later] == [expected] * 4
        assert all(s["processes"] == 2 for s in later)
        assert gpu.stats.snapshot()["completed"] == 2
    finally:
        ws.close()

    # The merged view survives one process going away: it drops out after a few seconds.
    b.stop()
    ws = UsageSocket(a.url, session)
    try:
        alone = ws.wait_for(lambda s: s["processes"] == 1, timeout=15)
        assert tokens_of(alone, gpu.url, MODEL) == expected  # B flushed before it stopped
    finally:
        ws.close()
