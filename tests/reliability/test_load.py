"""A bounded load test: a few thousand mixed requests, under a watchdog.

Both protocols, streaming and not, over two endpoints whose limits force queueing. The
run must finish (a deadlock fails on the watchdog instead of hanging CI), every reply
must be complete, no slot may stay taken and every token must be counted exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import pytest

from tests.reliability.support import (
    MODEL_KEY,
    PROMPT_TOKENS,
    Reply,
    Totals,
    async_client,
    chat,
    fake_totals,
    metrics_of,
    run_async,
    wait_db_totals,
    wait_idle,
)

TOTAL = 2000
CONCURRENCY = 48
TOKENS = 3
LIMITS = {"first": 3, "second": 2}


@pytest.mark.timeout(90)
def test_it_serves_thousands_of_mixed_requests_without_deadlock_leak_or_lost_token(fakes, endpoint, router):
    # ~10 ms per reply and five slots for 48 clients: most requests wait in the queue
    first = fakes(models=[MODEL_KEY], tokens=TOKENS, delay=0.003)
    second = fakes(models=[MODEL_KEY], tokens=TOKENS, delay=0.003)
    endpoint(first.url, name="first", max_concurrent_connections=LIMITS["first"])
    endpoint(second.url, name="second", max_concurrent_connections=LIMITS["second"])
    server = router()
    kinds = list(itertools.product(("ollama", "openai"), (False, True)))
    work = iter(itertools.islice(itertools.cycle(kinds), TOTAL))

    async def worker(client, replies: list[Reply]) -> None:
        for protocol, stream in work:
            replies.append(await chat(client, protocol, stream=stream, tokens=TOKENS))

    async def load() -> list[Reply]:
        replies: list[Reply] = []
        async with async_client(server) as client:
            await asyncio.gather(*(worker(client, replies) for _ in range(CONCURRENCY)))
        return replies

    started = time.monotonic()
    replies = run_async(load, watchdog=75)
    elapsed = time.monotonic() - started
    assert len(replies) == TOTAL
    assert len({r.request_id for r in replies}) == TOTAL
    by_endpoint = Counter(r.endpoint for r in replies)
    assert set(by_endpoint) == {"first", "second"}
    wait_idle(server)
    for name, fake in (("first", first), ("second", second)):
        assert fake.stats.max_in_flight == {MODEL_KEY: LIMITS[name]}
        assert fake.stats.in_flight == {MODEL_KEY: 0}
        assert fake.stats.cancelled == 0
    assert first.stats.completed + second.stats.completed == TOTAL
    assert fake_totals(first, second) == (TOTAL * PROMPT_TOKENS, TOTAL * TOKENS)
    wait_db_totals(Totals(TOTAL * PROMPT_TOKENS, TOTAL * TOKENS, TOTAL, 0))
    metrics = metrics_of(server)
    assert metrics.value("router_tokens_total", direction="input") == TOTAL * PROMPT_TOKENS
    assert metrics.value("router_tokens_total", direction="output") == TOTAL * TOKENS
    assert metrics.value("router_requests_total", status="200", route="/api/chat") == TOTAL / 2
    assert metrics.value("router_requests_total", status="200", route="/v1/chat/completions") == TOTAL / 2
    assert metrics.value("router_queue_wait_seconds_count") == TOTAL
    quick = metrics.value("router_queue_wait_seconds_bucket", le="0.001")
    assert quick < TOTAL / 2  # most requests waited in the queue (typically all but ~5)
    print(f"{TOTAL} requests in {elapsed:.1f} s ({TOTAL / elapsed:.0f}/s), {dict(by_endpoint)}")
