"""Limits, the queue and slot release, through the real server over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx

from tests.conftest import wait_until
from tests.integration.helpers import in_flight, queued

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}]}


def test_it_keeps_forty_concurrent_requests_within_the_limit_and_finishes_them_all(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=4, delay=0.01)
    endpoint(fake.url, max_concurrent_connections=2)
    server = router()

    async def forty() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def one(i: int) -> int:
                body = {**CHAT, "stream": i % 2 == 0}
                reply = await client.post("/api/chat", json=body)
                lines = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
                assert lines[-1]["done"] is True
                return reply.status_code

            return list(await asyncio.gather(*(one(i) for i in range(40))))

    statuses = asyncio.run(forty())
    assert statuses == [200] * 40
    stats = fake.stats.snapshot()
    assert stats["max_in_flight"]["llama3:latest"] == 2
    assert stats["completed"] == 40
    assert in_flight(server.url) == 0 and queued(server.url) == 0


def test_it_answers_503_with_retry_after_when_the_queue_wait_runs_out(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=20, delay=0.1)
    endpoint(fake.url, max_concurrent_connections=1)
    server = router(ROUTER_QUEUE_TIMEOUT="0.5")
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/api/chat", json=CHAT) as held,
    ):
        wait_until(lambda: in_flight(server.url) == 1)
        reply = client.post("/api/chat", json=CHAT)
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "5"
        assert "busy" in reply.json()["error"]
        held.read()
    wait_until(lambda: in_flight(server.url) == 0)


def test_it_answers_503_at_once_when_the_queue_is_full(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=20, delay=0.1)
    endpoint(fake.url, max_concurrent_connections=1)
    server = router(ROUTER_QUEUE_MAX="0")
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/api/chat", json=CHAT) as held,
    ):
        wait_until(lambda: in_flight(server.url) == 1)
        reply = client.post("/api/chat", json=CHAT)
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        held.read()


def _raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_it_releases_every_slot_when_the_client_disconnects_mid_stream(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=200, delay=0.05)
    endpoint(fake.url, max_concurrent_connections=4)
    server = router()
    sockets = [_raw_request(server.port, CHAT) for _ in range(3)]
    for sock in sockets:
        assert b"200 OK" in sock.recv(4096)  # headers and first chunks arrived: mid-stream
    wait_until(lambda: in_flight(server.url) == 3)
    for sock in sockets:
        sock.close()
    wait_until(lambda: in_flight(server.url) == 0)
    # The upstream requests were cancelled too, not left running on the GPU.
    wait_until(lambda: fake.stats.snapshot()["cancelled"] == 3)
    assert sum(fake.stats.snapshot()["in_flight"].values()) == 0


def test_it_releases_the_slot_of_a_queued_request_whose_client_leaves(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=40, delay=0.05)
    endpoint(fake.url, max_concurrent_connections=1)
    server = router()
    first = _raw_request(server.port, CHAT)
    wait_until(lambda: in_flight(server.url) == 1)
    second = _raw_request(server.port, CHAT)
    wait_until(lambda: queued(server.url) == 1)
    second.close()
    wait_until(lambda: queued(server.url) == 0)
    first.close()
    wait_until(lambda: in_flight(server.url) == 0)
    assert fake.stats.snapshot()["requests"]["/api/chat"] == 1  # the queued one never reached it
