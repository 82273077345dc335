"""Memory bounded by settings, not by clients (issue 11, item 4), under daphne and uvicorn,
over real sockets:

- backpressure: a client that reads a large streamed reply slowly (or not at all) holds the
  backend back too: the fake's bytes written stall far below the reply's size, instead of
  the router reading it all into memory; the slot comes back when the client hangs up, and
  a client that catches up gets every byte;
- a body over ROUTER_MAX_BODY: a huge Content-Length is answered 413 in the route's shape
  before any byte of the body is sent (also with `Expect: 100-continue`: no "100 Continue"),
  and a chunked body is cut off once it passes the limit.

The memory figures themselves (RSS) are measured by `make bench` (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import RouterProcess, wait_until
from tests.reliability.support import chat_body, metrics_of, wait_idle

MODEL = "llama3:latest"
TOKENS = 20_000
PAD = 4_000  # about 82 MB of NDJSON in 4 kB lines: far more than all the buffers on the way
SERVERS = ["daphne", "uvicorn"]
MAX_BODY = 1 << 20


def _open_stream(server: RouterProcess, *, rcvbuf: int = 16384) -> tuple[socket.socket, bytes]:
    """A streamed /api/chat over a socket with a small receive buffer; returns after the head,
    with the body bytes received so far."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    body = json.dumps(chat_body(stream=True)).encode()
    head = (
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(1024)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock, received.split(b"\r\n\r\n", 1)[1]


def _stalled(read: Callable[[], int], settle: float = 1.0, timeout: float = 60.0) -> int:
    """The value of `read()` once it stops changing for `settle` seconds."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = read()
        if now == last:
            return int(now)
        last = now
    raise AssertionError(f"never stalled (last {last})")


@pytest.mark.parametrize("server_name", SERVERS)
def test_a_slow_reader_throttles_the_backend_and_frees_its_slot_on_hang_up(
    server_name, fakes, endpoint, router
):
    fake = fakes(kind="ollama", models=[MODEL], tokens=TOKENS, pad=PAD)
    endpoint(fake.url, max_concurrent_connections=1)
    server = router(server=server_name)
    total = _reply_size(fake)
    fake.stats.reset()

    sock, _ = _open_stream(server)
    # Not reading: everything between the backend and this socket fills, then the backend waits.
    held = _stalled(lambda: fake.stats.bytes_streamed)
    assert held < total // 2, (held, total)  # unthrottled, the backend would write it all at once
    # Reading slowly (1 KB at a time): the backend moves on only as the client does.
    read = 0
    for _ in range(100):
        chunk = sock.recv(1024)
        assert chunk
        read += len(chunk)
        time.sleep(0.01)
    assert fake.stats.completed == 0
    assert fake.stats.bytes_streamed < total // 2, (fake.stats.bytes_streamed, total)
    sock.close()  # hang up while throttled
    wait_idle(server)
    wait_until(lambda: fake.stats.cancelled == 1 and not any(fake.stats.in_flight.values()))


@pytest.mark.parametrize("server_name", SERVERS)
def test_a_throttled_reply_arrives_whole_once_the_client_reads(server_name, fakes, endpoint, router):
    fake = fakes(kind="ollama", models=[MODEL], tokens=TOKENS, pad=PAD)
    endpoint(fake.url, max_concurrent_connections=1)
    server = router(server=server_name)
    sock, first = _open_stream(server)
    held = _stalled(lambda: fake.stats.bytes_streamed)
    assert fake.stats.completed == 0 and held > 0
    parts = [first]
    tail = first
    while not tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked reply's last chunk
        part = sock.recv(1 << 20)
        assert part, tail
        parts.append(part)
        tail = (tail + part)[-16:]
    sock.close()
    lines = [line for line in _unchunk(b"".join(parts)).splitlines() if line.strip()]
    assert len(lines) == TOKENS + 1
    last = json.loads(lines[-1])
    assert (last["done"], last["eval_count"]) == (True, TOKENS)
    assert fake.stats.completed == 1
    wait_idle(server)


def _reply_size(fake) -> int:  # type: ignore[no-untyped-def]
    """The streamed reply's size, fetched straight from the fake."""
    import httpx

    with httpx.stream("POST", fake.url + "/api/chat", json=chat_body(stream=True), timeout=60) as reply:
        return sum(len(part) for part in reply.iter_raw())


def _unchunk(data: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out: list[bytes] = []
    at = 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


# ------------------------------------------------------------------------ request bodies


def _raw(server: RouterProcess, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head.encode())
    return sock


def _read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one reply with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, data
        data += part
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        part = sock.recv(65536)
        assert part
        body += part
    return int(lines[0].split()[1]), headers, body


def _generations(fake) -> int:  # type: ignore[no-untyped-def]
    """Requests the fake saw on generation routes (the router's own probes aside)."""
    requests = fake.stats.snapshot()["requests"]
    return int(requests.get("/api/chat", 0) + requests.get("/v1/chat/completions", 0))


def _assert_shape(path: str, headers: dict[str, str], body: bytes) -> None:
    assert headers["content-type"] == "application/json"
    assert headers.get("x-request-id")
    error = json.loads(body)["error"]
    if path.startswith("/v1/"):
        assert error["type"] == "invalid_request_error" and "larger than" in error["message"]
    else:
        assert isinstance(error, str) and "larger than" in error


@pytest.mark.parametrize("server_name", SERVERS)
@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_a_huge_content_length_gets_413_before_the_body_is_sent(server_name, expect, fakes, endpoint, router):
    fake = fakes(kind="ollama", models=[MODEL], tokens=2)
    endpoint(fake.url)
    server = router(server=server_name, ROUTER_MAX_BODY=str(MAX_BODY))
    for path in ("/api/chat", "/v1/chat/completions"):
        extra = "Expect: 100-continue\r\n" if expect else ""
        sock = _raw(
            server,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {400 << 20}\r\n{extra}\r\n",
        )
        status, headers, body = _read_reply(sock)  # not one byte of the 400 MB was sent
        sock.close()
        assert status == 413, body
        _assert_shape(path, headers, body)
        assert headers.get("connection") == "close"
    assert _generations(fake) == 0
    wait_idle(server)
    counted = metrics_of(server)  # each refusal is counted under its own route (daphne: in Twisted)
    for path in ("/api/chat", "/v1/chat/completions"):
        assert counted.value("router_requests_total", route=path, endpoint="", status="413") == 1


@pytest.mark.parametrize("server_name", SERVERS)
def test_a_chunked_body_over_the_limit_is_cut_off(server_name, fakes, endpoint, router):
    fake = fakes(kind="ollama", models=[MODEL], tokens=2)
    endpoint(fake.url)
    server = router(server=server_name, ROUTER_MAX_BODY=str(MAX_BODY))
    sock = _raw(
        server,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n",
    )
    piece = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
    most = 512 << 20  # what the client would send if nobody stopped it
    sent = 0
    stopped = threading.Event()

    def send_forever() -> None:
        nonlocal sent
        try:
            while sent < most:
                sock.sendall(piece)
                sent += 1 << 16
        except OSError:
            pass  # the router closed the connection: the body was cut off
        stopped.set()

    writer = threading.Thread(target=send_forever, daemon=True)
    writer.start()
    status, headers, body = _read_reply(sock)
    assert status == 413, body
    _assert_shape("/api/chat", headers, body)
    assert stopped.wait(60), "the router went on reading the body"
    assert sent < most
    sock.close()
    assert _generations(fake) == 0
    # The router is fine afterwards.
    import httpx

    reply = httpx.post(server.url + "/api/chat", json=chat_body(stream=False), timeout=30)
    assert (reply.status_code, reply.json()["eval_count"]) == (200, 2)


# ------------------------------------------------------------------------ slow bodies (slowloris)


@pytest.mark.parametrize("server_name", SERVERS)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_trickled_past_the_body_timeout_gets_408_and_its_connection_closed(
    server_name, chunked, fakes, endpoint, router
):
    fake = fakes(kind="ollama", models=[MODEL], tokens=2)
    endpoint(fake.url)
    server = router(server=server_name, ROUTER_BODY_TIMEOUT="1")
    for path in ("/api/chat", "/v1/chat/completions"):
        framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 1000"
        sock = _raw(
            server, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
        )
        started = time.monotonic()
        trickling = threading.Event()

        def trickle(sock: socket.socket = sock, done: threading.Event = trickling) -> None:
            try:
                while not done.is_set():  # one byte every 0.2 s: never done within the timeout
                    sock.sendall(b"1\r\n \r\n" if chunked else b" ")
                    time.sleep(0.2)
            except OSError:
                pass  # the router closed the connection

        writer = threading.Thread(target=trickle, daemon=True)
        writer.start()
        status, headers, body = _read_reply(sock)
        elapsed = time.monotonic() - started
        trickling.set()
        assert status == 408, body
        assert 0.9 <= elapsed < 5, elapsed
        assert headers["content-type"] == "application/json" and headers.get("connection") == "close"
        error = json.loads(body)["error"]
        message = error["message"] if path.startswith("/v1/") else error
        assert "did not arrive within 1 s" in message
        try:  # closed by the router: a FIN, or a reset when the trickle's last bytes crossed the close
            assert sock.recv(65536) == b""
        except ConnectionResetError:
            pass
        sock.close()
        writer.join(5)
    assert _generations(fake) == 0
    # a body sent in parts, in time, is served as usual
    payload = json.dumps(chat_body(stream=False)).encode()
    sock = _raw(
        server,
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n",
    )
    for at in range(0, len(payload), 16):
        sock.sendall(payload[at : at + 16])
        time.sleep(0.02)
    status, _, body = _read_reply(sock)
    sock.close()
    assert status == 200, body
    wait_idle(server)
    counted = metrics_of(server)
    for path in ("/api/chat", "/v1/chat/completions"):
        assert counted.value("router_requests_total", route=path, status="408") == 1
