"""Shutdown drains (issue 11, item 5), under daphne and uvicorn, over real sockets: on
SIGTERM a stream in flight completes whole while new requests get 503 with Retry-After in
their protocol's shape and /health answers 503 "draining"; its tokens reach the database;
a stream longer than ROUTER_DRAIN_TIMEOUT is cut with its protocol's error, recorded as
incomplete, and the process exits."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import pytest

from stats.models import TokenTotal
from tests.conftest import wait_until
from tests.integration.helpers import queued
from tests.reliability.support import PROMPT_TOKENS, RawRequest, chat_body

MODEL = "llama3:latest"
SERVERS = ["daphne", "uvicorn"]


def _lines(raw: bytes) -> list[dict[str, object]]:
    """The NDJSON objects of a chunked reply read whole from a socket (head included)."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    out = b""
    at = 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            break
        out += body[end + 2 : end + 2 + size]
        at = end + 2 + size + 2
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _exit_code(server, timeout: float = 60) -> int:  # type: ignore[no-untyped-def]
    try:
        return int(server.proc.wait(timeout))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the router did not exit:\n{server.log()[-3000:]}") from None


@pytest.mark.parametrize("server_name", SERVERS)
def test_sigterm_lets_a_stream_finish_and_refuses_new_requests(server_name, fakes, endpoint, router):
    tokens = 40
    fake = fakes(kind="ollama", models=[MODEL], tokens=tokens, delay=0.1)  # a 4 s stream
    endpoint(fake.url, max_concurrent_connections=4)
    server = router(server=server_name, ROUTER_FLUSH_INTERVAL="3600")  # only the final flush writes
    keep_alive = httpx.Client(base_url=server.url, timeout=10)
    assert keep_alive.get("/api/version").status_code == 200  # a connection open before the signal

    stream = RawRequest.post_json(server, "/api/chat", chat_body(stream=True))
    stream.read_until(b'"done":false', 2)  # the reply is under way
    server.proc.send_signal(signal.SIGTERM)

    # While it drains: /health says so, new requests get 503 + Retry-After in their own shape.
    def health() -> httpx.Response:
        return httpx.get(server.url + "/health", timeout=10)

    probe = health()
    for _ in range(50):  # the signal reaches the router's loop a moment later
        if probe.status_code == 503:
            break
        probe = health()
    assert (probe.status_code, probe.json()) == (503, {"status": "draining"})
    for client in (httpx, keep_alive):  # a new connection, and one opened before
        ollama = client.post(server.url + "/api/chat", json=chat_body(stream=False), timeout=10)
        assert ollama.status_code == 503 and ollama.headers["retry-after"]
        assert "shutting down" in ollama.json()["error"]
        openai = client.post(server.url + "/v1/chat/completions", json=chat_body(stream=False), timeout=10)
        assert openai.status_code == 503 and openai.headers["retry-after"]
        assert openai.json()["error"]["type"] == "service_unavailable"
    keep_alive.close()

    # The stream in flight completes whole, then the router exits and its tokens are in the DB.
    lines = _lines(stream.read_to_end())
    stream.close()
    assert len(lines) == tokens + 1
    assert (lines[-1]["done"], lines[-1]["eval_count"]) == (True, tokens)
    assert _exit_code(server) in (0, -signal.SIGTERM)
    row = TokenTotal.objects.get()
    assert (row.input_tokens, row.output_tokens, row.requests, row.incomplete) == (
        PROMPT_TOKENS,
        tokens,
        1,
        0,
    )
    assert fake.stats.completed == 1 and fake.stats.cancelled == 0
    assert "Traceback" not in server.log()
    # every request has its one access-log line, the ones refused while draining included
    log_lines = server.log().splitlines()
    for route, status, count in [
        ("/api/chat", 503, 2),
        ("/v1/chat/completions", 503, 2),
        ("/api/chat", 200, 1),
    ]:
        assert sum(f"POST {route} {status} " in line for line in log_lines) == count, (route, status)


@pytest.mark.parametrize("server_name", SERVERS)
def test_a_stream_longer_than_the_drain_timeout_is_cut_and_the_router_exits(
    server_name, fakes, endpoint, router
):
    fake = fakes(kind="ollama", models=[MODEL], tokens=600, delay=0.1)  # a 60 s stream
    endpoint(fake.url, max_concurrent_connections=1)
    server = router(server=server_name, ROUTER_DRAIN_TIMEOUT="1", ROUTER_FLUSH_INTERVAL="3600")
    stream = RawRequest.post_json(server, "/api/chat", chat_body(stream=True))
    stream.read_until(b'"done":false', 2)
    # A second request waits in the queue for the one slot when the signal comes.
    waiting = RawRequest.post_json(server, "/v1/chat/completions", chat_body(stream=False))
    wait_until(lambda: queued(server.url) == 1)
    server.proc.send_signal(signal.SIGTERM)
    raw = stream.read_to_end()  # the router ends the reply after about ROUTER_DRAIN_TIMEOUT
    stream.close()
    lines = _lines(raw)
    assert 2 <= len(lines) < 600
    assert "shutting down" in str(lines[-1]["error"])  # the protocol's own mid-stream error
    assert all(line.get("done") is False for line in lines[:-1])
    assert waiting.status() == 503 and waiting.header("retry-after")
    assert (
        json.loads(waiting.read_to_end().split(b"\r\n\r\n", 1)[1])["error"]["type"] == "service_unavailable"
    )
    waiting.close()
    assert _exit_code(server) in (0, -signal.SIGTERM)
    row = TokenTotal.objects.get()
    assert (row.input_tokens, row.output_tokens, row.requests, row.incomplete) == (0, 0, 1, 1)
    assert fake.stats.completed == 0
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("server_name", SERVERS)
def test_a_second_signal_cuts_at_once(server_name, fakes, endpoint, router):
    fake = fakes(kind="ollama", models=[MODEL], tokens=600, delay=0.1)  # a 60 s stream
    endpoint(fake.url)
    server = router(server=server_name, ROUTER_DRAIN_TIMEOUT="600")
    stream = RawRequest.post_json(server, "/api/chat", chat_body(stream=True))
    stream.read_until(b'"done":false', 2)
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(server.url + "/health", timeout=10).status_code == 503)
    server.proc.send_signal(signal.SIGTERM)
    lines = _lines(stream.read_to_end())  # long before the 600 s drain would end
    stream.close()
    assert "shutting down" in str(lines[-1]["error"])
    assert _exit_code(server) in (0, -signal.SIGTERM)
    assert fake.stats.completed == 0
