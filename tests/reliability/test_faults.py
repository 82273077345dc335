"""Backend faults: the client gets a clear end or error, slots come back, the endpoint's
breaker opens on evidence about the server and closes by itself, and failover happens
before the first byte only where the request cannot have run.

The fake backends fail on demand (bench/fake_backend.py `fault`). ROUTER_FAILING_TTL=8
makes the router re-probe an endpoint whose breaker is open every 2 s, so a test can see
the open state right after the fault and the recovery a little later. Weak evidence (a
cut reply, a 5xx) opens it only after ROUTER_BREAKER_FAILURES of them in a row.
"""

from __future__ import annotations

import http.client
import json
import time

import httpx
import pytest

from bench.fake_backend import run_in_thread
from tests.conftest import start_router
from tests.reliability.support import (
    MODEL_KEY,
    PROMPT_TOKENS,
    Totals,
    chat_body,
    db_totals,
    endpoint_up,
    metrics_of,
    wait_db_totals,
    wait_idle,
    wait_up,
)

pytestmark = pytest.mark.timeout(60)

RECOVERY = {"ROUTER_FAILING_TTL": "8"}
PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}


def post(server, protocol: str, *, stream: bool, timeout: float = 10) -> httpx.Response:
    return httpx.post(server.url + PATHS[protocol], json=chat_body(stream=stream), timeout=timeout)


def assert_ok(response: httpx.Response, endpoint: str) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["x-router-endpoint"] == endpoint


def stream_error(protocol: str, body: bytes) -> tuple[int, str]:
    """(token chunks before the error, the error message) of a stream the router cut short."""
    if protocol == "ollama":
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert all(line.get("done") is False for line in lines[:-1]), lines
        assert set(lines[-1]) == {"error"} and isinstance(lines[-1]["error"], str), lines[-1]
        return len(lines) - 1, lines[-1]["error"]
    events = [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]
    assert "[DONE]" not in events, events
    chunks = [json.loads(e) for e in events]
    assert all("choices" in c for c in chunks[:-1]), chunks
    error = chunks[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "api_error", error
    return len(chunks) - 1, error["message"]


@pytest.mark.parametrize("protocol", ["ollama", "openai"])
def test_it_ends_the_stream_with_an_error_when_the_backend_dies_midstream_and_recovers(
    protocol, fakes, endpoint, router
):
    fake = fakes(models=[MODEL_KEY], tokens=8, fault="die_midstream", fault_after=3)
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router(ROUTER_BREAKER_FAILURES="2", **RECOVERY)
    for cuts in (1, 2):
        with httpx.stream("POST", server.url + PATHS[protocol], json=chat_body(stream=True), timeout=10) as r:
            assert r.status_code == 200
            body = r.read()  # the router ends its reply cleanly: no hang, no broken chunking
        chunks, message = stream_error(protocol, body)
        assert chunks == 3 and message.startswith("upstream solo: ")  # named, never its url
        # one cut reply may be about that request: weak evidence; the second in a row opens it
        assert endpoint_up(server, "solo") == (1 if cuts == 1 else 0)
    wait_idle(server)
    wait_db_totals(Totals(0, 0, 2, 2))  # counted as requests without counts, no invented tokens
    fake.config.fault = "none"
    wait_up(server, "solo", True)
    assert_ok(post(server, protocol, stream=True), "solo")
    wait_db_totals(Totals(PROMPT_TOKENS, 8, 3, 2))


def test_it_cuts_a_stalled_stream_after_the_read_timeout_and_cancels_the_upstream(fakes, endpoint, router):
    fake = fakes(models=[MODEL_KEY], tokens=8, fault="stall", stall=30, fault_after=2)
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router(ROUTER_READ_TIMEOUT="1", **RECOVERY)
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/api/chat", json=chat_body(stream=True), timeout=10) as r:
        assert r.status_code == 200
        body = r.read()
    assert 1 <= time.monotonic() - started < 4
    assert endpoint_up(server, "solo") == 1  # one stall is weak evidence: it stays in rotation
    chunks, message = stream_error("ollama", body)
    assert chunks == 2 and message.startswith("upstream solo: ")
    wait_idle(server)
    assert fake.stats.cancelled == 1 and fake.stats.in_flight == {MODEL_KEY: 0}
    fake.config.fault = "none"
    assert_ok(post(server, "ollama", stream=False), "solo")


# fault -> (protocol, stream) of the request that meets it: failures before the first byte
# that say the request did not run there (refused, "busy" 503, closed unanswered twice)
FAILOVER_CASES = {
    "503": ("openai", False),
    "reset": ("openai", True),
    "refused": ("ollama", False),
}


@pytest.mark.parametrize("fault", list(FAILOVER_CASES))
def test_it_fails_over_to_the_second_endpoint_before_the_first_byte(fault, fakes, endpoint, router):
    # `bad` has the model loaded, so the router tries it first
    bad = fakes(models=[MODEL_KEY], loaded=[MODEL_KEY], tokens=8)
    good = fakes(models=[MODEL_KEY], tokens=8)
    endpoint(bad.url, name="bad", max_concurrent_connections=2)
    endpoint(good.url, name="good", max_concurrent_connections=2)
    server = router(ROUTER_FIRST_BYTE_TIMEOUT="1", **RECOVERY)
    protocol, stream = FAILOVER_CASES[fault]
    assert_ok(post(server, protocol, stream=stream), "bad")  # warm: bad is known loaded
    wait_db_totals(Totals(PROMPT_TOKENS, 8, 1, 0), bad.url, settle=False)
    bad.stats.reset()
    if fault == "refused":
        bad.stop()
    else:
        bad.config.fault = fault
    response = post(server, protocol, stream=stream)
    assert_ok(response, "good")
    # a refused connection is evidence about the server; a 503 or a reset is weak evidence
    assert endpoint_up(server, "bad") == (0 if fault == "refused" else 1)
    assert endpoint_up(server, "good") == 1
    metrics = metrics_of(server)
    assert metrics.value("router_failovers_total") == 1
    wait_idle(server)
    if fault == "reset":
        assert bad.stats.faults == 2  # once on the pooled connection, once on a fresh one
    elif fault == "503":
        assert bad.stats.faults == 1
    if fault != "refused":
        assert bad.stats.in_flight.get(MODEL_KEY, 0) == 0
    wait_db_totals(Totals(PROMPT_TOKENS, 8, 1, 0), good.url)
    assert db_totals(bad.url) == Totals(PROMPT_TOKENS, 8, 1, 0)  # the failed try counts nothing


def test_a_500_goes_to_its_client_alone_and_never_opens_the_breaker_but_repeated_503s_do(
    fakes, endpoint, router
):
    fake = fakes(models=[MODEL_KEY], fault="500")
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router(ROUTER_BREAKER_FAILURES="2", **RECOVERY)
    first = post(server, "ollama", stream=True)
    assert first.status_code == 500 and first.headers["x-router-endpoint"] == "solo"
    assert first.json() == {"error": "fake fault: internal server error"}  # Ollama's shape
    for _ in range(4):  # far past the threshold: a complete 500 is an answer about its request
        again = post(server, "openai", stream=False)
        assert again.status_code == 500
        assert again.json()["error"]["message"] == "fake fault: internal server error"
    assert endpoint_up(server, "solo") == 1
    assert fake.stats.faults == 5
    # a 503 says the server did not take the work: weak evidence, out after the second in a row
    fake.config.fault = "503"
    assert post(server, "openai", stream=False).status_code == 502  # no other server to try
    assert endpoint_up(server, "solo") == 1
    assert post(server, "openai", stream=False).status_code == 502
    assert endpoint_up(server, "solo") == 0
    third = post(server, "openai", stream=False)  # out of rotation: answered at once
    assert third.status_code == 503 and third.headers["retry-after"] == "5"
    error = third.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "service_unavailable"
    assert fake.stats.faults == 7
    wait_idle(server)
    fake.config.fault = "none"
    wait_up(server, "solo", True)
    assert_ok(post(server, "openai", stream=False), "solo")


def test_it_passes_a_garbage_reply_through_and_counts_it_as_incomplete(fakes, endpoint, router):
    fake = fakes(models=[MODEL_KEY], fault="garbage")
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router(**RECOVERY)
    for protocol, stream in (("ollama", True), ("ollama", False), ("openai", True), ("openai", False)):
        response = post(server, protocol, stream=stream)
        assert response.status_code == 200
        assert response.content == b"this is not json\n"
    wait_idle(server)
    wait_db_totals(Totals(0, 0, 4, 4))  # four requests, none with counts


def test_it_marks_a_vanished_backend_failing_and_recovers_when_it_returns_on_the_same_port(
    fakes, endpoint, router
):
    fake = fakes(models=[MODEL_KEY], tokens=8)
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = router(ROUTER_FAILING_TTL="2")  # re-probed every 0.5 s
    assert_ok(post(server, "ollama", stream=False), "solo")
    port, config = fake.port, fake.config
    fake.stop()
    gone = post(server, "ollama", stream=True)
    assert gone.status_code == 502
    assert set(gone.json()) == {"error"} and "connection refused" in gone.json()["error"]
    still = post(server, "openai", stream=True)
    assert still.status_code == 503 and still.headers["retry-after"] == "5"
    assert still.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(server.url + "/api/tags").json() == {"models": []}
    since = metrics_of(server).value("router_endpoint_breaker_since_seconds", endpoint="solo")
    assert since > 0
    time.sleep(1.5)  # several failed re-probes: it stays failing while it does not answer
    assert endpoint_up(server, "solo") == 0
    # the outage's start does not restart at each failed probe (the page said "for 0s")
    assert metrics_of(server).value("router_endpoint_breaker_since_seconds", endpoint="solo") == since
    health = httpx.get(server.url + "/health").json()["endpoints"]["solo"]
    assert health["breaker"] == "open" and health["breaker_since"] == since
    assert health["breaker_reason"] == "connection refused"
    wait_idle(server)
    back = run_in_thread(config, port=port)
    try:
        wait_up(server, "solo", True, timeout=5)
        assert [m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]] == [MODEL_KEY]
        assert_ok(post(server, "openai", stream=True), "solo")
        assert back.stats.completed == 1
    finally:
        back.stop()
    wait_db_totals(Totals(2 * PROMPT_TOKENS, 16, 2, 0))


@pytest.mark.parametrize("server_kind", ["daphne", "uvicorn"])
def test_a_client_reading_slowly_is_not_a_stalled_backend(
    server_kind, fakes, endpoint, transactional_db, tmp_path
):
    # uvicorn waits for a slow client before taking the next chunk, so the upstream is paused
    # by flow control and sends nothing for seconds: that must not count as its stall.
    tokens = 60_000  # about 7 MB, more than the socket buffers hold
    fake = fakes(models=[MODEL_KEY], tokens=tokens)
    endpoint(fake.url, name="solo", max_concurrent_connections=1)
    server = start_router(tmp_path, server=server_kind, ROUTER_READ_TIMEOUT="1", **RECOVERY)
    try:
        slow = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        slow.request("POST", "/api/chat", body=json.dumps(chat_body(stream=True)))
        time.sleep(3)  # three read timeouts without reading a byte
        response = slow.getresponse()
        assert response.status == 200
        lines = response.read().splitlines()
        slow.close()
        final = json.loads(lines[-1])
        assert (final.get("done"), final.get("eval_count")) == (True, tokens), lines[-1][:300]
        assert len(lines) == tokens + 1
        assert endpoint_up(server, "solo") == 1
    finally:
        server.stop()
