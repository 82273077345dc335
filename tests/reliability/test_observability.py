"""Observability: /metrics is valid Prometheus text with every documented series, and each
proxied reply names its endpoint (by name, never url or key) and its request id, which the
access log line repeats."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import wait_until
from tests.reliability.support import (
    MODEL_KEY,
    PROMPT_TOKENS,
    RawRequest,
    chat_body,
    metrics_of,
    wait_idle,
)

pytestmark = pytest.mark.timeout(60)


def test_it_exposes_every_documented_series_in_the_prometheus_text_format(fakes, endpoint, router):
    bad = fakes(models=[MODEL_KEY], loaded=[MODEL_KEY], fault="503")  # tried first, fails over
    good = fakes(models=[MODEL_KEY], tokens=4)
    endpoint(bad.url, name="bad", max_concurrent_connections=1)
    endpoint(good.url, name="good", max_concurrent_connections=1)
    server = router(ROUTER_FAILING_TTL="8", ROUTER_BREAKER_FAILURES="1")  # one 503 opens its breaker
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/api/chat", json=chat_body(stream=False)).headers["x-router-endpoint"] == "good"
        assert client.post("/api/chat", json=chat_body(stream=True)).status_code == 200
        assert client.post("/v1/chat/completions", json=chat_body(stream=True)).status_code == 200
        assert client.post("/api/chat", json=chat_body(stream=False, model="nope")).status_code == 404
        assert client.get("/api/no-such-route").status_code == 404  # counted as route="other"
    # one request holds good's only slot, a second one waits for it
    good.config.delay = 0.1
    long = RawRequest.post_json(server, "/api/chat", chat_body(stream=True))
    long.read_until(b'"done":false')
    waiting = RawRequest.post_json(server, "/v1/chat/completions", chat_body(stream=False))
    wait_until(lambda: metrics_of(server).value("router_queued", model=MODEL_KEY) == 1, timeout=5)
    busy = metrics_of(server)
    assert busy.types["router_in_flight"] == "gauge" and busy.types["router_queued"] == "gauge"
    assert busy.value("router_in_flight", endpoint="good", model=MODEL_KEY) == 1
    assert waiting.status() == 200 and b'"done":true' in long.read_to_end()
    long.close()
    waiting.close()
    wait_idle(server)

    metrics = metrics_of(server)  # parsed strictly: malformed lines or histograms fail here
    assert all("instance" in s.labels for s in metrics.samples)
    assert metrics.types == {
        **metrics.types,
        "router_requests_total": "counter",
        "router_tokens_total": "counter",
        "router_failovers_total": "counter",
        "router_upstream_first_byte_seconds": "histogram",
        "router_request_duration_seconds": "histogram",
        "router_queue_wait_seconds": "histogram",
        "router_in_flight": "gauge",
        "router_queued": "gauge",
        "router_endpoint_up": "gauge",
        "router_endpoint_breaker_state": "gauge",
        "router_endpoint_breaker_since_seconds": "gauge",
        "router_endpoint_breaker_reason": "gauge",
        "router_fresh_connection_retries_total": "counter",
        "router_lock_wait_seconds_total": "counter",
        "router_lock_wait_max_seconds": "gauge",
        "router_lock_acquisitions_total": "counter",
    }
    # requests by route, endpoint and status
    requests = "router_requests_total"
    assert metrics.value(requests, route="/api/chat", endpoint="good", status="200") == 3
    assert metrics.value(requests, route="/v1/chat/completions", endpoint="good", status="200") == 2
    assert metrics.value(requests, route="/api/chat", endpoint="", status="404") == 1
    # every path of the route table is its own label (the statistics routes too); others are "other"
    assert metrics.value(requests, route="/api/usage", endpoint="", status="200") > 0  # wait_idle polls it
    assert metrics.value(requests, route="other", endpoint="", status="404") == 1
    # time to first byte and duration, by route
    assert metrics.value("router_upstream_first_byte_seconds_count", route="/api/chat") == 3
    assert metrics.value("router_upstream_first_byte_seconds_count", route="/v1/chat/completions") == 2
    assert metrics.value("router_request_duration_seconds_count", route="/api/chat") == 4
    assert metrics.value("router_request_duration_seconds_sum", route="/api/chat") > 0.4  # the slow one
    # one wait per slot taken: the failed try on `bad` took one too
    assert metrics.value("router_queue_wait_seconds_count") == 6
    assert metrics.value("router_queue_wait_seconds_bucket", le="0.05") == 5  # one waited ~1 s
    # tokens, failovers, endpoint state
    assert metrics.value("router_tokens_total", direction="input") == 5 * PROMPT_TOKENS
    assert metrics.value("router_tokens_total", direction="output") == 5 * 4
    assert metrics.value("router_failovers_total") == 1
    assert metrics.value("router_endpoint_up", endpoint="bad") == 0
    assert metrics.value("router_endpoint_up", endpoint="good") == 1
    breaker = "router_endpoint_breaker_state"
    assert metrics.value(breaker, endpoint="bad", state="open") == 1
    assert metrics.value(breaker, endpoint="bad") == 1  # one state at a time
    assert metrics.value(breaker, endpoint="good", state="closed") == 1
    assert metrics.value("router_endpoint_breaker_reason", endpoint="bad", reason="HTTP 503") == 1
    assert metrics.value("router_endpoint_breaker_since_seconds", endpoint="bad") > 1.7e9
    assert metrics.value("router_endpoint_breaker_since_seconds", endpoint="good") == 0
    # lock wait times, per lock
    for lock in ("usage", "registry", "recorder"):
        assert metrics.has("router_lock_wait_seconds_total", lock=lock)
        assert metrics.has("router_lock_wait_max_seconds", lock=lock)
        assert metrics.value("router_lock_acquisitions_total", lock=lock) > 0


SECRET = "sk-do-not-leak-4711"

# (method, path, body): every route that proxies to one chosen endpoint
PROXIED = [
    ("POST", "/api/chat", chat_body(stream=False)),
    ("POST", "/api/chat", chat_body(stream=True)),
    ("POST", "/api/generate", {"model": "llama3", "prompt": "hi", "stream": False}),
    ("POST", "/api/generate", {"model": "llama3", "prompt": "hi"}),
    ("POST", "/api/embed", {"model": "nomic-embed", "input": ["a", "b"]}),
    ("POST", "/api/embeddings", {"model": "nomic-embed", "prompt": "a"}),
    ("POST", "/api/show", {"model": "llama3"}),
    ("POST", "/v1/chat/completions", chat_body(stream=False)),
    ("POST", "/v1/chat/completions", chat_body(stream=True)),
    ("POST", "/v1/completions", {"model": "llama3", "prompt": "hi"}),
    ("POST", "/v1/completions", {"model": "llama3", "prompt": "hi", "stream": True}),
    ("POST", "/v1/embeddings", {"model": "nomic-embed", "input": "a"}),
]


def test_it_names_the_endpoint_and_request_id_on_every_proxied_reply_and_its_log_line(
    fakes, endpoint, router
):
    fake = fakes(models=[MODEL_KEY, "nomic-embed:latest"], api_key=SECRET)
    endpoint(fake.url, name="gpu-a", api_key=SECRET, max_concurrent_connections=2)
    server = router()
    ids: list[tuple[str, str]] = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for method, path, body in PROXIED:
            response = client.request(method, path, json=body)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["x-router-endpoint"] == "gpu-a", path
            request_id = response.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{16}", request_id), request_id
            for value in response.headers.values():
                assert SECRET not in value and fake.url not in value and str(fake.port) not in value
            assert SECRET not in response.text
            ids.append((path, request_id))
        # a request id the client sends is kept (and bounded)
        mine = client.post("/api/chat", json=chat_body(stream=False), headers={"X-Request-Id": "trace-42"})
        assert mine.headers["x-request-id"] == "trace-42"
        ids.append(("/api/chat", "trace-42"))
        long = client.post("/api/chat", json=chat_body(stream=False), headers={"X-Request-Id": "x" * 500})
        assert long.headers["x-request-id"] == "x" * 64
        # errors carry a request id too, and name no endpoint
        missing = client.post("/v1/chat/completions", json=chat_body(stream=False, model="nope"))
        assert missing.status_code == 404 and "x-router-endpoint" not in missing.headers
        assert missing.headers["x-request-id"]
        metrics = client.get("/metrics").text
    assert len({rid for _, rid in ids}) == len(ids)
    assert all(auth == f"Bearer {SECRET}" for auth in fake.stats.auth_headers_seen)  # sent upstream
    wait_until(lambda: all(f"request_id={rid}" in server.log() for _, rid in ids))
    log = server.log()
    for path, rid in ids:
        (line,) = [line for line in log.splitlines() if line.endswith(f"request_id={rid}")]
        assert f" {path} 200 " in line and " endpoint=gpu-a " in line, line
    assert f"request_id={missing.headers['x-request-id']}" in log
    assert SECRET not in log and SECRET not in metrics
