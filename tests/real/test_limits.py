"""Caps, disconnects, failover and keep-alive against real llama.cpp servers, through the router.

What llama-server does here that the fakes do not: it really runs two generations at once
(--parallel 2) unless the router holds the second back; it stops generating when its client
(the router) hangs up; it refuses connections once killed; and it closes an idle keep-alive
connection after ~5 s, racing the router's reuse of that pooled connection.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import wait_until
from tests.integration.helpers import in_flight, queued
from tests.real.conftest import Real
from tests.real.llama import ALIAS, LlamaServer
from tests.reliability.support import RawRequest, endpoint_up, run_async

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a long story about a cat."}]


def chat_body(path: str, tokens: int, *, stream: bool = True) -> dict[str, Any]:
    """A chat request of at most `tokens` tokens, in the shape of `path`'s protocol."""
    if path.startswith("/api/"):
        options = {"num_predict": tokens, "temperature": 0}
        return {"model": ALIAS, "messages": MESSAGES, "stream": stream, "options": options}
    return {"model": ALIAS, "messages": MESSAGES, "stream": stream, "max_tokens": tokens, "temperature": 0}


def busy_slots(server: LlamaServer) -> int:
    """Generations llama-server is running right now, from its own GET /slots."""
    slots = httpx.get(server.url + "/slots", timeout=5).json()
    return sum(1 for s in slots if s.get("is_processing"))


@dataclass
class Watch:
    """The most the router and the server held at once while the block ran, and whether
    the router had a request waiting in its queue."""

    router_in_flight: int = 0
    server_busy: int = 0
    queued_seen: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)


@contextmanager
def watching(real: Real, interval: float = 0.02) -> Iterator[Watch]:
    watch = Watch()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                watch.router_in_flight = max(watch.router_in_flight, in_flight(real.url))
                watch.queued_seen = max(watch.queued_seen, queued(real.url))
                watch.server_busy = max(watch.server_busy, busy_slots(real.llamas[0]))
                watch.samples += 1
            except (httpx.HTTPError, ValueError) as exc:
                watch.errors.append(repr(exc))
            stop.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(10)


@dataclass
class Timed:
    status: int
    first_byte: float
    end: float
    body: bytes


async def timed_stream(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> Timed:
    async with session.post(path, json=body) as response:
        first = 0.0
        chunks = []
        async for chunk in response.content.iter_any():
            first = first or time.monotonic()
            chunks.append(chunk)
        return Timed(response.status, first, time.monotonic(), b"".join(chunks))


def done_openai_stream(raw: bytes) -> bool:
    events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
    return bool(events) and events[-1] == "[DONE]"


def complete(path: str, stream: bool, raw: bytes) -> bool:
    """Whether a reply is whole in its protocol's shape: [DONE], a final `done` line, or choices."""
    if path.startswith("/api/"):
        lines = raw.decode().strip().splitlines()
        return bool(lines) and json.loads(lines[-1]).get("done") is True
    if stream:
        return done_openai_stream(raw)
    return bool(json.loads(raw).get("choices"))


def test_the_cap_of_one_holds_the_second_request_until_the_first_is_done(real_router):
    real = real_router(limit=1)  # the server has two slots; the router must use one

    async def two() -> list[Timed]:
        async with aiohttp.ClientSession(base_url=real.url, timeout=aiohttp.ClientTimeout(total=90)) as s:
            first = asyncio.create_task(timed_stream(s, "/v1/chat/completions", chat_body("/v1/", 48)))
            await asyncio.sleep(0.3)  # the first holds the slot
            second = asyncio.create_task(timed_stream(s, "/api/chat", chat_body("/api/", 48)))
            return [await first, await second]

    with watching(real) as watch:
        first, second = run_async(two, watchdog=120)
    assert (first.status, second.status) == (200, 200), (first.body[-300:], second.body[-300:])
    assert done_openai_stream(first.body)
    assert json.loads(second.body.splitlines()[-1])["done"] is True
    assert watch.samples >= 3 and not watch.errors, watch  # a loaded machine samples less often
    assert watch.router_in_flight == 1 and watch.server_busy == 1, watch
    assert watch.queued_seen == 1, watch  # the second waited in the router's queue
    assert second.first_byte >= first.end - 0.05  # and started only when the first had finished
    wait_until(lambda: in_flight(real.url) == 0 and queued(real.url) == 0)


def test_a_client_hanging_up_mid_stream_frees_the_slot_and_stops_the_generation(real_router):
    real = real_router(limit=1)
    for path in ("/v1/chat/completions", "/api/chat"):
        client = RawRequest.post_json(real.router, path, chat_body(path, 400))
        client.read_until(b'"content"', count=4)  # a few tokens arrived: mid-stream
        assert busy_slots(real.llamas[0]) == 1
        client.close()
        wait_until(lambda: in_flight(real.url) == 0, timeout=10)
        # the router hung up on llama-server too, which stopped generating (400 tokens would take seconds)
        wait_until(lambda: busy_slots(real.llamas[0]) == 0, timeout=5)
    # the slot is really free: the next request is served at once, not after a queue wait
    oai = openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    started = time.monotonic()
    reply = oai.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None and time.monotonic() - started < 10
    assert in_flight(real.url) == 0 and queued(real.url) == 0


def test_requests_keep_succeeding_on_the_other_server_when_one_is_killed(real_router):
    real = real_router(count=2, limit=2)
    oai = openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def one(i: int) -> str:
        """One request through the router, alternating API and streaming; the endpoint that served it."""
        stream = i % 2 == 1
        if i % 4 < 2:
            path, body = "/v1/chat/completions", chat_body("/v1/", 4, stream=stream)
        else:
            path, body = "/api/chat", chat_body("/api/", 4, stream=stream)
        reply = httpx.post(real.url + path, json=body, timeout=30)
        assert reply.status_code == 200, (i, reply.status_code, reply.text[:300])
        if path == "/api/chat":
            assert json.loads(reply.text.splitlines()[-1])["done"] is True, reply.text[-300:]
        else:
            assert done_openai_stream(reply.content) if stream else reply.json()["choices"], reply.text[-300:]
        return reply.headers["X-Router-Endpoint"]

    served = [one(i) for i in range(4)]
    assert set(served) <= set(real.names)
    # kill the server that served last, the one the router is using
    dead = real.names.index(served[-1])
    survivor = real.names[1 - dead]
    real.llamas[dead].kill()
    after = [one(i) for i in range(8)]
    assert after == [survivor] * 8  # every one succeeded, on the server still alive
    assert oai.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=2).choices
    assert endpoint_up(real.router, survivor) == 1
    wait_until(lambda: endpoint_up(real.router, real.names[dead]) == 0, timeout=10)
    wait_until(lambda: in_flight(real.url) == 0)


# llama-server closes a connection ~0.1-0.2 s after the last chunk of a streamed reply, without
# saying so (no `Connection: close`), and an idle one 5 s after a whole reply (its keep-alive).
# A router that reuses such a pooled connection sees it close before any reply byte. Streamed
# and whole requests follow each other at once, and some wait around the 5 s mark (seconds).
# Measured on a router that reuses such connections: 1-20% of the requests right after a stream
# fail, depending on timing (the machine's load), hence 150 requests (100 after a stream, ~15 s).
REQUESTS = 150
PAUSES = {2: 5.5, 44: 4.95, 86: 5.05, 128: 5.5}


def test_back_to_back_requests_survive_the_servers_connection_closes(real_router):
    real = real_router(limit=2)
    failures: list[str] = []
    with httpx.Client(base_url=real.url, timeout=30) as client:
        for i in range(REQUESTS):
            stream = i % 3 != 2
            if i % 2:
                path, body = "/v1/chat/completions", chat_body("/v1/", 4, stream=stream)
            else:
                path, body = "/api/chat", chat_body("/api/", 4, stream=stream)
            reply = client.post(path, json=body)
            if reply.status_code != 200 or not complete(path, stream, reply.content):
                failures.append(
                    f"request {i} ({path}, stream={stream}): {reply.status_code} {reply.text[:160]}"
                )
            if i in PAUSES:
                time.sleep(PAUSES[i])
    assert failures == [], f"{len(failures)} of {REQUESTS} failed:\n" + "\n".join(failures)
    assert endpoint_up(real.router, real.names[0]) == 1  # and the server was never marked failing
