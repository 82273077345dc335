"""Load generators of `make bench`: wrk for throughput and latency, small asyncio clients
for time to first byte and for many concurrent slow streams.

wrk (a C program) is the throughput client, so the client is never what is measured.
The asyncio clients below speak just enough HTTP/1.1 (keep-alive, Content-Length and
chunked replies) to time the first byte of a reply; they run fewer requests, and the
same client is used for the direct and the routed side, so its own cost cancels out in
the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LUA = Path(__file__).resolve().parent / "post.lua"
RESULT_PREFIX = "BENCH_RESULT "


class WrkMissing(RuntimeError):
    pass


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissing(
            "wrk is not installed. On Debian/Ubuntu: apt-get install -y wrk "
            "(as root; `make bench` tries this itself when it may)"
        )
    return found


def wrk_version() -> str:
    proc = subprocess.run([wrk_path(), "-v"], capture_output=True, text=True, check=False)
    first = (proc.stdout or proc.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    errors: int
    status_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    bytes: int
    command: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def failures(self) -> int:
        return self.errors + self.status_errors

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "rps": self.rps}


def run_wrk(
    url: str,
    body: str,
    *,
    connections: int,
    duration: float,
    threads: int = 1,
    timeout: float = 10.0,
    auth: str = "",
) -> WrkResult:
    """One wrk run; POSTs `body` to `url` over `connections` keep-alive connections (with
    `Authorization: Bearer <auth>` when given)."""
    cmd = [
        wrk_path(),
        f"-t{max(1, min(threads, connections))}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={max(1, round(timeout))}s",
        "-s",
        str(LUA),
        url,
    ]
    env = {**os.environ, "BENCH_BODY": body, "BENCH_AUTH": auth}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    data = json.loads(line[len(RESULT_PREFIX) :])
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        errors=data["err_connect"] + data["err_read"] + data["err_write"] + data["err_timeout"],
        status_errors=data["err_status"],
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        p999_ms=data["p999"] / 1000,
        mean_ms=data["lat_mean"] / 1000,
        max_ms=data["lat_max"] / 1000,
        bytes=data["bytes"],
        command=" ".join([*cmd[:-3], "-s", "bench/post.lua", url]),
    )


# -- a minimal HTTP/1.1 client -------------------------------------------------------
def _request_bytes(url: str, body: bytes, *, close: bool = False) -> bytes:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: */*\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class ProtocolError(Exception):
    pass


@dataclass
class Timing:
    status: int
    first_byte: float  # seconds from the request's first byte sent to the reply's first body byte
    headers: float  # ... to the end of the reply's headers
    total: float  # ... to the reply's last byte
    body_bytes: int


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Timing:
    started = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    t_head = time.perf_counter()
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise ProtocolError(f"bad status line {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    first: float | None = None
    size = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            if first is None:
                first = time.perf_counter()
            n = int(size_line.split(b";", 1)[0].strip(), 16)
            if n == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                break
            await reader.readexactly(n + 2)
            size += n
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            await reader.readexactly(1)
            first = time.perf_counter()
            await reader.readexactly(n - 1)
        size = n
    else:
        raise ProtocolError("reply without Content-Length or chunked encoding")
    done = time.perf_counter()
    return Timing(status, (first or t_head) - started, t_head - started, done - started, size)


@dataclass
class TtfbResult:
    n: int
    errors: int
    ttfb_ms: list[float] = field(repr=False)
    total_ms: list[float] = field(repr=False)

    def pct(self, values: list[float], p: float) -> float:
        return percentile(values, p)

    def summary(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "errors": self.errors,
            "ttfb_p50_ms": percentile(self.ttfb_ms, 50),
            "ttfb_p99_ms": percentile(self.ttfb_ms, 99),
            "ttfb_mean_ms": statistics.fmean(self.ttfb_ms) if self.ttfb_ms else 0.0,
            "total_p50_ms": percentile(self.total_ms, 50),
            "total_p99_ms": percentile(self.total_ms, 99),
        }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def ttfb(url: str, body: bytes, *, n: int, warmup: int = 20) -> TtfbResult:
    """`n` sequential requests on one keep-alive connection, timing each reply's first body byte."""
    host, port = _host_port(url)
    request = _request_bytes(url, body)
    reader, writer = await asyncio.open_connection(host, port)
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
    try:
        for i in range(warmup + n):
            try:
                timing = await asyncio.wait_for(_exchange(reader, writer, request), 30)
            except (OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            if timing.status != 200:
                errors += 1
            elif i >= warmup:
                firsts.append(timing.first_byte * 1000)
                totals.append(timing.total * 1000)
    finally:
        writer.close()
    return TtfbResult(n, errors, firsts, totals)


async def sequential_posts(url: str, body: bytes, *, n: int, warmup: int = 3) -> TtfbResult:
    """Like `ttfb`, for replies that are not streamed (e.g. /api/stats)."""
    return await ttfb(url, body, n=n, warmup=warmup)


# -- many slow streams ---------------------------------------------------------------
class _StreamProtocol(asyncio.Protocol):
    """Reads one streamed reply on a `Connection: close` connection, cheaply.

    Only the status, the byte count, the moment of the first and last byte and the
    reply's tail are kept; the reply is complete when the connection ends after the
    chunked terminator.
    """

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.started = 0.0
        self.first = 0.0
        self.last = 0.0
        self.received = 0
        self.head = b""
        self.tail = b""
        self.status = 0
        self.error = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.started = time.perf_counter()
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = now
        self.last = now
        self.received += len(data)
        if self.status == 0:
            self.head += data
            if b"\r\n" in self.head:
                try:
                    self.status = int(self.head.split(b" ", 2)[1])
                except (IndexError, ValueError):
                    self.status = -1
        self.tail = (self.tail + data)[-512:]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.error = f"{type(exc).__name__}: {exc}"
        if not self.done.done():
            self.done.set_result(None)


@dataclass
class StreamOutcome:
    ok: bool
    status: int
    duration_s: float
    first_byte_s: float
    error: str
    opened: float  # perf_counter() when connected
    closed: float  # ... when the reply ended (or failed)


@dataclass
class SlowStreamsResult:
    streams: int
    ok: int
    errors: int
    error_samples: list[str]
    duration_p50_s: float
    duration_p99_s: float
    duration_max_s: float
    first_byte_p50_ms: float
    first_byte_p99_ms: float
    wall_s: float
    open_at_once: int  # the most streams open together, as the client saw them
    chunks_per_s: float  # token chunks that reached the client per second, over the whole run


def _complete(proto: _StreamProtocol, done_marker: bytes) -> bool:
    return proto.status == 200 and proto.tail.endswith(b"0\r\n\r\n") and done_marker in proto.tail


async def slow_streams(
    url: str,
    body: bytes,
    *,
    streams: int,
    ramp_s: float,
    timeout: float,
    done_marker: bytes,
    chunks_per_stream: int,
) -> SlowStreamsResult:
    """`streams` concurrent streamed requests, started evenly over `ramp_s`, each on its own connection.

    A stream succeeds when its reply is 200, chunked, ends with the terminator and its
    tail holds `done_marker` (the final line of a complete reply).
    """
    host, port = _host_port(url)
    request = _request_bytes(url, body, close=True)
    loop = asyncio.get_running_loop()

    async def one(delay: float) -> StreamOutcome:
        await asyncio.sleep(delay)
        done: asyncio.Future[None] = loop.create_future()
        proto = _StreamProtocol(request, done)
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(lambda: proto, host, port)
                await done
        except (OSError, TimeoutError) as exc:
            proto.error = proto.error or f"{type(exc).__name__}: {exc}"
        finally:
            if transport is not None:
                transport.close()
        ok = _complete(proto, done_marker) and not proto.error
        if not ok and not proto.error:
            proto.error = f"incomplete reply (status {proto.status}, {proto.received} bytes)"
        return StreamOutcome(
            ok,
            proto.status,
            (proto.last or time.perf_counter()) - proto.started if proto.started else 0.0,
            proto.first - proto.started if proto.first else 0.0,
            proto.error,
            proto.started or time.perf_counter(),
            proto.last or time.perf_counter(),
        )

    started = time.perf_counter()
    step = ramp_s / streams if streams else 0.0
    outcomes = await asyncio.gather(*(one(i * step) for i in range(streams)))
    wall = time.perf_counter() - started
    good = [o for o in outcomes if o.ok]
    durations = [o.duration_s for o in good]
    firsts = [o.first_byte_s * 1000 for o in good]
    samples = sorted({o.error for o in outcomes if not o.ok})[:5]
    events = sorted([(o.opened, 1) for o in outcomes] + [(o.closed, -1) for o in outcomes])
    open_now = open_max = 0
    for _, step_ in events:
        open_now += step_
        open_max = max(open_max, open_now)
    return SlowStreamsResult(
        streams=streams,
        ok=len(good),
        errors=streams - len(good),
        error_samples=samples,
        duration_p50_s=percentile(durations, 50),
        duration_p99_s=percentile(durations, 99),
        duration_max_s=max(durations, default=0.0),
        first_byte_p50_ms=percentile(firsts, 50),
        first_byte_p99_ms=percentile(firsts, 99),
        wall_s=wall,
        open_at_once=open_max,
        chunks_per_s=len(good) * chunks_per_stream / wall if wall else 0.0,
    )


# -- memory bounds: slow readers and refused bodies -------------------------------------
@dataclass
class SlowReadersResult:
    streams: int
    started: int  # replies that began with 200
    bytes_read: int  # by all clients together
    errors: int
    error_samples: list[str]
    duration_s: float


async def slow_readers(
    url: str, body: bytes, *, streams: int, read_bytes: int, interval: float, duration: float
) -> SlowReadersResult:
    """`streams` streamed requests, each on its own socket, each reading at most `read_bytes`
    every `interval` seconds (straight from the socket: nothing read ahead in the client) for
    `duration` seconds; then every client hangs up."""
    host, port = _host_port(url)
    request = _request_bytes(url, body, close=True)
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration
    ramp = min(1.0, duration / 4) / max(1, streams)

    async def one(index: int) -> tuple[bool, int, str]:
        await asyncio.sleep(index * ramp)
        sock = socket.socket()
        sock.setblocking(False)
        got = 0
        head = b""
        try:
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, request)
            while (left := stop_at - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, read_bytes), left)
                except TimeoutError:
                    break
                if not data:
                    return head.startswith(b"HTTP/1.1 200"), got, "the router closed the reply early"
                got += len(data)
                if len(head) < 16:
                    head += data[:16]
                await asyncio.sleep(min(interval, max(0.0, stop_at - loop.time())))
            return head.startswith(b"HTTP/1.1 200"), got, "" if head else "no reply"
        except OSError as exc:
            return False, got, f"{type(exc).__name__}: {exc}"
        finally:
            sock.close()

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(streams)))
    errors = [err for _, _, err in outcomes if err]
    return SlowReadersResult(
        streams=streams,
        started=sum(1 for ok, _, _ in outcomes if ok),
        bytes_read=sum(n for _, n, _ in outcomes),
        errors=len(errors),
        error_samples=sorted(set(errors))[:5],
        duration_s=time.perf_counter() - started,
    )


@dataclass
class BodyOutcome:
    status: int  # of the router's reply, 0 when none arrived
    sent: int  # body bytes the client got to send before the router stopped reading
    cut: bool  # the router closed the connection before the whole body was sent
    error: str


async def big_bodies(url: str, *, bodies: int, size: int, chunked: bool, timeout: float) -> list[BodyOutcome]:
    """`bodies` concurrent POSTs of a `size`-byte body (Content-Length, or chunked), each
    written as fast as the router takes it without waiting for its reply (as a naive client
    does), while the reply is read alongside."""
    host, port = _host_port(url)
    parts = urlsplit(url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    piece_size = 1 << 20
    payload = b" " * piece_size
    piece = b"%x\r\n%s\r\n" % (piece_size, payload) if chunked else payload
    loop = asyncio.get_running_loop()

    async def one() -> BodyOutcome:
        sock = socket.socket()
        sock.setblocking(False)
        sent = 0
        received = bytearray()
        error = ""

        async def read() -> None:
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    return
                received.extend(data)

        reader: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
                reader = asyncio.create_task(read())
                await loop.sock_sendall(sock, head)
                while sent < size:
                    await loop.sock_sendall(sock, piece)
                    sent += piece_size
                if chunked:
                    await loop.sock_sendall(sock, b"0\r\n\r\n")
                await reader
        except (OSError, TimeoutError) as exc:
            error = f"{type(exc).__name__}"
            if reader is not None and not reader.done():
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(2):
                        await reader
        finally:
            if reader is not None:
                reader.cancel()
            sock.close()
        status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else 0
        return BodyOutcome(status=status, sent=min(sent, size), cut=sent < size, error=error)

    return list(await asyncio.gather(*(one() for _ in range(bodies))))
