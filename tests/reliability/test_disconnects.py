"""Clients that hang up at every point: before an endpoint is chosen, while queued, while
waiting for the first byte, while a whole reply is generated, mid-stream.

Each time: no slot stays taken, nothing stays queued, a request already sent upstream is
cancelled there (the fake counts it), the endpoint is not blamed, and the next request
is served at once. Raw sockets decide exactly when the client goes away.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from routing.models import Endpoint
from tests.conftest import wait_until
from tests.reliability.support import (
    MODEL_KEY,
    PROMPT_TOKENS,
    RawRequest,
    Totals,
    chat_body,
    endpoint_up,
    in_flight,
    metrics_of,
    queued,
    slow_route,
    wait_db_totals,
    wait_idle,
)

pytestmark = pytest.mark.timeout(60)

MARKERS = {"/api/chat": b'"done":false', "/v1/chat/completions": b"data: {"}


def served_at_once(server, path: str = "/api/chat") -> None:
    started = time.monotonic()
    response = httpx.post(server.url + path, json=chat_body(stream=False), timeout=10)
    assert response.status_code == 200 and response.headers["x-router-endpoint"] == "solo"
    assert time.monotonic() - started < 2


def test_it_takes_no_slot_and_sends_nothing_when_the_client_leaves_before_an_endpoint_is_chosen(
    fakes, endpoint, router
):
    fake = fakes(models=[MODEL_KEY], tokens=3)
    ep = endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router()
    # 1. gone while its body is still arriving
    partial = RawRequest(server, "POST", "/api/chat", b'{"model": "lla', declared_length=400)
    time.sleep(0.3)
    partial.close()
    # 2. gone while the router probes the endpoint (cold cache, slow /api/tags)
    slow_route(fake, "GET", "/api/tags", 1.0)
    Endpoint.objects.filter(id=ep.id).update(max_concurrent_connections=2)  # drops the caches
    time.sleep(0.5)
    fake.stats.reset()
    probing = RawRequest.post_json(server, "/api/chat", chat_body(stream=True))
    time.sleep(0.3)
    probing.close()
    time.sleep(1.2)  # the probe ends after its client left
    assert fake.stats.requests == {"/api/tags": 1}  # nothing was sent for the departed request
    assert not in_flight(server) and not queued(server)
    # the probe was finished for the others: the next request uses its result at once
    served_at_once(server)
    assert fake.stats.requests.get("/api/tags") == 1 and fake.stats.requests.get("/api/chat") == 1
    assert metrics_of(server).value("router_requests_total", route="/api/chat", status="499") == 1


def test_it_forgets_a_queued_request_whose_client_leaves(fakes, endpoint, router):
    fake = fakes(models=[MODEL_KEY], tokens=40, delay=0.05)
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router()
    long = RawRequest.post_json(server, "/api/chat", chat_body(stream=True))
    long.read_until(MARKERS["/api/chat"])
    waiting = RawRequest.post_json(server, "/v1/chat/completions", chat_body(stream=True))
    wait_until(lambda: queued(server) == {MODEL_KEY: 1}, timeout=5)
    waiting.close()
    wait_until(lambda: not queued(server), timeout=3)
    assert in_flight(server) == {("solo", MODEL_KEY): 1}  # the long one still runs
    assert b'"done":true' in long.read_to_end()
    long.close()
    wait_idle(server)
    assert "/v1/chat/completions" not in fake.stats.requests  # never reached the backend
    assert fake.stats.max_in_flight == {MODEL_KEY: 1}
    fake.config.delay = 0
    served_at_once(server, "/v1/chat/completions")
    wait_db_totals(Totals(2 * PROMPT_TOKENS, 80, 2, 0))
    assert metrics_of(server).value("router_requests_total", status="499") == 1


def test_it_cancels_the_upstream_when_the_client_leaves_mid_stream(fakes, endpoint, router):
    fake = fakes(models=[MODEL_KEY], tokens=200, delay=0.02)
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router()

    def cancelled(n: int) -> Callable[[], bool]:
        return lambda: fake.stats.cancelled == n

    for n, path in enumerate(("/api/chat", "/v1/chat/completions"), 1):
        client = RawRequest.post_json(server, path, chat_body(stream=True))
        client.read_until(MARKERS[path], count=3)
        client.close()
        wait_until(cancelled(n), timeout=3)
        wait_idle(server)
        assert fake.stats.in_flight == {MODEL_KEY: 0}
        assert endpoint_up(server, "solo") == 1  # the client left: not the backend's fault
    assert fake.stats.completed == 0
    wait_db_totals(Totals(0, 0, 2, 2))  # two requests without counts, no invented tokens
    fake.config.update({"tokens": 3, "delay": 0})
    served_at_once(server)


def test_it_cancels_the_upstream_when_the_client_leaves_before_the_reply_starts(fakes, endpoint, router):
    fake = fakes(models=[MODEL_KEY], tokens=100, first_byte_delay=10)
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router()
    # 1. waiting for the first byte of a stream (a model loading)
    client = RawRequest.post_json(server, "/api/chat", chat_body(stream=True))
    wait_until(lambda: fake.stats.in_flight == {MODEL_KEY: 1}, timeout=3)
    client.close()
    wait_until(lambda: fake.stats.cancelled == 1, timeout=3)
    wait_idle(server)
    # 2. while a whole (non-streamed) reply is generated
    fake.config.update({"first_byte_delay": 0, "delay": 0.05})
    client = RawRequest.post_json(server, "/v1/chat/completions", chat_body(stream=False))
    wait_until(lambda: fake.stats.in_flight == {MODEL_KEY: 1}, timeout=3)
    client.close()
    wait_until(lambda: fake.stats.cancelled == 2, timeout=3)
    wait_idle(server)
    assert fake.stats.completed == 0 and fake.stats.in_flight == {MODEL_KEY: 0}
    assert endpoint_up(server, "solo") == 1
    assert metrics_of(server).value("router_requests_total", status="499") == 2
    fake.config.update({"tokens": 3, "delay": 0})
    served_at_once(server)
