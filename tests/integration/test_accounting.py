"""Every token a backend reports is counted exactly once, over both protocols, and survives restarts."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from stats.models import TokenTimeSeries, TokenTotal
from tests.conftest import wait_until


def _burst(url: str, n: int) -> list[int]:
    """n concurrent requests, alternating protocol and streaming; returns the statuses."""

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def one(i: int) -> int:
                stream = i % 2 == 0
                if i % 4 < 2:
                    body = {
                        "model": "llama3",
                        "messages": [{"role": "user", "content": "a b c"}],
                        "stream": stream,
                    }
                    reply = await client.post("/api/chat", json=body)
                else:
                    body = {
                        "model": "qwen-coder",
                        "messages": [{"role": "user", "content": "a b c"}],
                        "stream": stream,
                    }
                    reply = await client.post("/v1/chat/completions", json=body)
                return reply.status_code

            return list(await asyncio.gather(*(one(i) for i in range(n))))

    return asyncio.run(run())


def _db_totals() -> tuple[int, int, int]:
    rows = list(TokenTotal.objects.all())
    return (
        sum(r.input_tokens for r in rows),
        sum(r.output_tokens for r in rows),
        sum(r.requests for r in rows),
    )


def _reported(*fakes) -> tuple[int, int]:
    snaps = [f.stats.snapshot() for f in fakes]
    return (
        sum(s["prompt_tokens_reported"] for s in snaps),
        sum(s["completion_tokens_reported"] for s in snaps),
    )


@pytest.fixture
def two_protocols(fakes, endpoint):
    ollama_fake = fakes(kind="ollama", models=["llama3:latest"], tokens=3, delay=0.001)
    llama_cpp = fakes(kind="openai", models=["qwen-coder"], tokens=4, delay=0.001)
    endpoint(ollama_fake.url, name="gpu-ollama", max_concurrent_connections=8)
    endpoint(llama_cpp.url + "/v1", name="gpu-llamacpp", kind="openai", max_concurrent_connections=8)
    return ollama_fake, llama_cpp


def test_it_counts_every_token_exactly_once_under_concurrency(two_protocols, router):
    server = router()
    statuses = _burst(server.url, 400)
    assert statuses == [200] * 400
    prompt, completion = _reported(*two_protocols)
    assert prompt > 0 and completion == 200 * 3 + 200 * 4
    wait_until(lambda: _db_totals() == (prompt, completion, 400), timeout=15)
    series = list(TokenTimeSeries.objects.all())
    assert sum(r.input_tokens for r in series) == prompt
    assert sum(r.output_tokens for r in series) == completion
    assert sum(r.requests for r in series) == 400
    assert all(r.timestamp.second == 0 and r.timestamp.microsecond == 0 for r in series)
    live = httpx.get(server.url + "/api/token_counts").json()
    assert live  # the router's own view answers too (shape checked in tests/stats)


def test_it_flushes_on_sigterm_and_continues_after_a_restart(two_protocols, router):
    server = router(ROUTER_FLUSH_INTERVAL="3600")  # only the shutdown flush can write
    assert _burst(server.url, 120) == [200] * 120
    prompt, completion = _reported(*two_protocols)
    assert _db_totals() == (0, 0, 0)
    assert server.stop(signal.SIGTERM) == 0
    assert _db_totals() == (prompt, completion, 120)

    again = router(ROUTER_FLUSH_INTERVAL="3600")
    assert _burst(again.url, 40) == [200] * 40
    prompt, completion = _reported(*two_protocols)
    again.stop(signal.SIGINT)
    assert _db_totals() == (prompt, completion, 160)


def test_it_records_nothing_it_cannot_know_for_a_stream_cut_off(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=10, fault="die_midstream", fault_after=2)
    endpoint(fake.url, max_concurrent_connections=2)
    server = router()
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(server.url + "/api/chat", json=body, timeout=30)
    assert reply.status_code == 200
    last = reply.text.strip().splitlines()[-1]
    assert '"error"' in last and "closed the connection mid-reply" in last  # a clear end for the client
    wait_until(lambda: TokenTotal.objects.filter(incomplete=1).exists(), timeout=10)
    row = TokenTotal.objects.get()
    assert (row.input_tokens, row.output_tokens, row.requests, row.incomplete) == (0, 0, 1, 1)
