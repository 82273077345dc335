"""How a server is chosen, through the real server over real sockets: requests fill tier 0
first and spill to tier 1 only while tier 0 is full, then come back; among equally free
servers the one quicker to its first byte gets the requests.

The tier fleet: "gpu", a fake Ollama server in tier 0, and "cpu", one in tier 1 that has the
model loaded (so only the tier keeps requests off it)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import httpx

from tests.conftest import wait_until
from tests.integration.helpers import in_flight

_TURN = itertools.count()


def chat(**extra: object) -> dict[str, object]:
    """A new conversation each time, so prompt-cache affinity (which keeps one conversation on
    its server, within its tier) stays out of the base choice these tests watch."""
    return {"model": "llama3", "messages": [{"role": "user", "content": f"hello {next(_TURN)}"}], **extra}


def test_requests_fill_tier_zero_then_spill_to_tier_one_and_come_back(fakes, endpoint, router):
    gpu = fakes(kind="ollama", models=["llama3:latest"], tokens=20, delay=0.05)
    cpu = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], tokens=20, delay=0.05)
    endpoint(gpu.url, name="gpu", max_concurrent_connections=1, tier=0)
    endpoint(cpu.url, name="cpu", max_concurrent_connections=4, tier=1)
    server = router()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/api/chat", json=chat()) as first:
            assert first.headers["x-router-endpoint"] == "gpu"
            wait_until(lambda: in_flight(server.url) == 1)
            with client.stream("POST", "/api/chat", json=chat()) as second:
                assert second.headers["x-router-endpoint"] == "cpu"  # tier 0 is full
                second.read()
            first.read()
        wait_until(lambda: in_flight(server.url) == 0)
        for _ in range(3):  # one at a time: tier 0 again, every time
            reply = client.post("/api/chat", json=chat(stream=False))
            assert reply.status_code == 200 and reply.headers["x-router-endpoint"] == "gpu"


def test_concurrent_requests_take_every_tier_zero_slot_before_tier_one(fakes, endpoint, router):
    gpu = fakes(kind="ollama", models=["llama3:latest"], tokens=10, delay=0.1)
    cpu = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], tokens=10, delay=0.1)
    endpoint(gpu.url, name="gpu", max_concurrent_connections=2, tier=0)
    endpoint(cpu.url, name="cpu", max_concurrent_connections=2, tier=1)
    server = router()

    async def six() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def one() -> str:
                reply = await client.post("/api/chat", json=chat(stream=False))
                assert reply.status_code == 200
                return reply.headers["x-router-endpoint"]

            return list(await asyncio.gather(*(one() for _ in range(6))))

    served = Counter(asyncio.run(six()))
    assert sum(served.values()) == 6
    # tier 0 was filled to its limit and never past it; the rest spilled to tier 1, within its own
    assert gpu.stats.snapshot()["max_in_flight"]["llama3:latest"] == 2
    assert 1 <= cpu.stats.snapshot()["max_in_flight"]["llama3:latest"] <= 2
    assert served["gpu"] >= 2 and served["cpu"] >= 1
    assert in_flight(server.url) == 0


def test_one_request_at_a_time_goes_to_the_server_quicker_to_its_first_byte(fakes, endpoint, router):
    """Two equal servers but "slow" answers 0.6 s later. While a server has not served yet its
    time is unknown and it ties with the other; once both are measured, "slow" gets nothing
    while "fast" is free."""
    fast = fakes(kind="ollama", models=["llama3:latest"], tokens=2)
    slow = fakes(kind="ollama", models=["llama3:latest"], tokens=2, first_byte_delay=0.6)
    endpoint(fast.url, name="fast", max_concurrent_connections=4)
    endpoint(slow.url, name="slow", max_concurrent_connections=4)
    server = router()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        served: set[str] = set()
        for _ in range(40):  # each try picks the unmeasured one at 1/2: both within 40 tries
            served.add(client.post("/api/chat", json=chat(stream=False)).headers["x-router-endpoint"])
            if served == {"fast", "slow"}:
                break
        assert served == {"fast", "slow"}
        after = [
            client.post("/api/chat", json=chat(stream=False)).headers["x-router-endpoint"] for _ in range(10)
        ]
    assert after == ["fast"] * 10


def test_a_conversation_that_spilled_to_tier_one_comes_back_to_tier_zero(fakes, endpoint, router):
    # Affinity once kept a conversation on the tier it spilled to (a CPU box, a paid API) for
    # its whole life, though tier 0 had room again from its next turn on.
    gpu = fakes(kind="ollama", models=["llama3:latest"], tokens=20, delay=0.05)
    cpu = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], tokens=2)
    endpoint(gpu.url, name="gpu", max_concurrent_connections=1, tier=0)
    endpoint(cpu.url, name="cpu", max_concurrent_connections=4, tier=1)
    server = router()
    turn = chat(stream=False)
    with httpx.Client(base_url=server.url, timeout=30, headers={"X-Session-Id": "conv-1"}) as client:
        with client.stream("POST", "/api/chat", json=chat(), headers={"X-Session-Id": "other"}) as busy:
            assert busy.headers["x-router-endpoint"] == "gpu"
            first = client.post("/api/chat", json=turn)
            assert first.headers["x-router-endpoint"] == "cpu"  # tier 0 is full: spilled
            busy.read()
        wait_until(lambda: in_flight(server.url) == 0)
        for _ in range(3):
            reply = client.post("/api/chat", json=turn)
            assert reply.status_code == 200 and reply.headers["x-router-endpoint"] == "gpu"
