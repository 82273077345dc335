"""Prompt-cache affinity over real sockets: the router process in front of two fake servers.

A conversation's turns (nothing names it: the key is its prompt's prefix) all reach one server;
when that server is full past ROUTER_AFFINITY_WAIT the turn goes to the other, and the turns
after it stay there. With affinity off the same turns are spread. With REDIS_URL two router
processes share what they remember."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import wait_until
from tests.integration.test_cluster import _redis_answers

SYSTEM = {"role": "system", "content": "You answer briefly."}


def turns(opening: str, n: int, last: str = "go on") -> list[list[dict[str, Any]]]:
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": opening}]
    out = [list(messages)]
    for k in range(1, n):
        messages.append({"role": "assistant", "content": f"reply {k}"})
        messages.append({"role": "user", "content": last if k == n - 1 else f"question {k}"})
        out.append(list(messages))
    return out


def chat(url: str, messages: list[dict[str, Any]], **extra: Any) -> str:
    reply = httpx.post(
        url + "/api/chat",
        json={"model": "llama3", "stream": False, "messages": messages, **extra},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply.headers["X-Router-Endpoint"]


def two_servers(fakes: Any, endpoint: Any) -> tuple[Any, Any]:
    a = fakes(kind="ollama", models=["llama3:latest"], tokens=3)
    b = fakes(kind="ollama", models=["llama3:latest"], tokens=3)
    endpoint(a.url, name="a", max_concurrent_connections=1)
    endpoint(b.url, name="b", max_concurrent_connections=1)
    return a, b


def test_it_sends_every_turn_of_a_conversation_to_one_server(fakes, endpoint, router):
    two_servers(fakes, endpoint)
    url = router().url
    for opening in ("tell me about tides", "tell me about volcanoes", "and about glaciers"):
        served = {chat(url, messages) for messages in turns(opening, 6)}
        assert len(served) == 1
    # OpenAI's route, keyed by the `user` field and then by a session header
    for extra, headers in (({"user": "u-1"}, {}), ({}, {"X-Session-Id": "s-1"})):
        names = set()
        for k in range(6):
            body = {"model": "llama3", "messages": [{"role": "user", "content": f"q{k}"}], **extra}
            reply = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert reply.status_code == 200
            names.add(reply.headers["X-Router-Endpoint"])
        assert len(names) == 1


def test_without_affinity_the_same_turns_are_spread(fakes, endpoint, router):
    two_servers(fakes, endpoint)
    url = router(ROUTER_AFFINITY="0").url
    served = {chat(url, messages) for messages in turns("tell me about tides", 20)}
    assert served == {"a", "b"}  # ties broken at random: one server alone has odds 2 ** -19


def test_a_turn_moves_when_its_server_stays_full_past_the_wait_and_the_next_turns_follow(
    fakes, endpoint, router
):
    a, b = two_servers(fakes, endpoint)
    url = router(ROUTER_AFFINITY_WAIT="0.3").url
    conversation = turns("tell me about tides", 6, last="SLOW please")
    first = chat(url, conversation[0])
    home, other = (a, "b") if first == "a" else (b, "a")
    # A turn of the same conversation (same key) that the home server answers slowly: it holds
    # the home server's only slot for 3 s.
    home.config.update({"first_byte_delay": 3.0, "fault_match": "SLOW please"})
    slow: dict[str, str] = {}
    blocker = threading.Thread(target=lambda: slow.update(name=chat(url, conversation[5])))
    blocker.start()
    try:
        wait_until(lambda: home.stats.snapshot()["in_flight"].get("llama3:latest", 0) == 1)
        moved = chat(url, conversation[1])  # its server is full: waits 0.3 s, then the other one
        assert moved == other
        assert chat(url, conversation[2]) == other  # the memory moved with it
    finally:
        blocker.join(30)
    assert slow["name"] == first
    assert chat(url, conversation[3]) == other  # still there once the home server is free again
    for fake in (a, b):  # never above the cap
        assert fake.stats.snapshot()["max_in_flight"]["llama3:latest"] == 1


def test_a_failover_moves_the_conversation_to_the_server_that_answered(fakes, endpoint, router):
    a, b = two_servers(fakes, endpoint)
    url = router().url
    conversation = turns("tell me about tides", 4)
    first = chat(url, conversation[0])
    home, other = (a, "b") if first == "a" else (b, "a")
    home.config.update({"fault": "503"})  # overloaded: the work was not taken, so it fails over
    assert chat(url, conversation[1]) == other
    home.config.update({"fault": "none"})
    assert {chat(url, messages) for messages in conversation[2:]} == {other}


@pytest.mark.skipif(not _redis_answers(), reason="no Redis at 127.0.0.1:6379 (CI starts one)")
def test_two_router_processes_share_what_they_remember_through_redis(fakes, endpoint, router):
    two_servers(fakes, endpoint)
    db = str(8 + uuid.uuid4().int % 7)  # a Redis database of its own, away from other tests
    redis_url = f"redis://127.0.0.1:6379/{db}"
    one, two = router(REDIS_URL=redis_url), router(REDIS_URL=redis_url)
    shared = redis.Redis.from_url(redis_url)
    for n in range(8):  # a process that ignored the other would match by chance with odds 2 ** -8
        conversation = turns(f"conversation {n} {uuid.uuid4().hex}", 4)
        first = chat(one.url, conversation[0])
        # written in the background after the pick: wait until it is there
        wait_until(lambda: bool(shared.keys("nomyo:affinity:llama3*")))
        assert {chat(two.url, messages) for messages in conversation[1:]} == {first}
        shared.flushdb()


def test_the_turns_of_an_anthropic_conversation_reach_one_server(fakes, endpoint, router):
    # /v1/messages was routed without an affinity key: Claude Code's turns were spread.
    two_servers(fakes, endpoint)
    url = router().url
    served = set()
    for messages in turns("tell me about tides", 12):
        body = {"model": "llama3", "max_tokens": 5, "system": SYSTEM["content"], "messages": messages[1:]}
        reply = httpx.post(url + "/v1/messages", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        served.add(reply.headers["X-Router-Endpoint"])
    assert len(served) == 1  # without affinity, one server alone for 12 turns has odds 2 ** -11


def test_the_memory_stays_bounded_whatever_sessions_clients_send(fakes, endpoint, router):
    two_servers(fakes, endpoint)
    server = router(ROUTER_AFFINITY_MAX="20")
    sessions = ["x" * 5000, "\u00e9t\u00e9 \u2603", *(f"session-{i}" for i in range(60))]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for session in sessions:
            headers = [(b"X-Session-Id", session.encode())]
            body = {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/api/chat", json=body, headers=headers).status_code == 200
        metrics = http.get("/metrics").text
    remembered = [line for line in metrics.splitlines() if line.startswith("router_affinity_remembered")]
    assert remembered and float(remembered[0].rsplit(" ", 1)[1]) == 20
