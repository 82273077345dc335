"""routing/upstream/client: one pooled session (and one httpx client over it) per event loop, a
separate no-pool session for the retry on a fresh connection, no cookies, GapWatch ending a
silent stream (and only a silent one), and close_client closing this loop's sessions.

A small HTTP/1.1 server on a loopback port (asyncio, in the test's loop) counts connections
and serves: /ok (a whole reply, keep-alive), /cookie (sets a cookie), /drip?n&gap (a chunked
reply, one chunk every `gap` s), /stall (one chunk, then silence).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio

from routing.upstream import client


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.cookies_seen: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {
                    k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                if "cookie" in headers:
                    self.cookies_seen.append(headers["cookie"])
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                url = urlsplit(target)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/ok":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                elif url.path == "/cookie":
                    writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: s=secret\r\nContent-Length: 2\r\n\r\nok")
                elif url.path in ("/drip", "/stall"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    n = int(query.get("n", "1"))
                    gap = float(query.get("gap", "0"))
                    for _ in range(n):
                        writer.write(b"2\r\nab\r\n")
                        await writer.drain()
                        await asyncio.sleep(gap)
                    if url.path == "/stall":
                        await asyncio.sleep(30)
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    await srv.start()
    yield srv
    await client.close_client()
    await srv.stop()


@pytest.mark.asyncio
async def test_one_session_and_one_client_per_loop():
    session = client.get_session()
    assert client.get_session() is session
    assert client.get_client() is client.get_client()
    other: list[aiohttp.ClientSession] = []

    def in_another_loop() -> None:
        async def run() -> None:
            other.append(client.get_session())
            await client.close_client()

        asyncio.run(run())

    thread = threading.Thread(target=in_another_loop)
    thread.start()
    thread.join()
    assert other and other[0] is not session and other[0].closed
    assert not session.closed  # closing the other loop's session left this one alone
    await client.close_client()
    assert session.closed
    assert client.get_session() is not session  # a closed session is replaced
    await client.close_client()


@pytest.mark.asyncio
async def test_the_pool_reuses_a_connection_and_the_fresh_session_never_does(server: Server):
    session = client.get_session()
    for _ in range(3):
        async with session.get(server.url + "/ok") as response:
            assert await response.read() == b"ok"
    assert server.connections == 1
    fresh = client.fresh_session()
    assert fresh is not session and client.fresh_session() is fresh
    for _ in range(3):
        async with fresh.get(server.url + "/ok") as response:
            assert await response.read() == b"ok"
    assert server.connections == 1 + 3


@pytest.mark.asyncio
async def test_no_cookie_is_kept_or_sent_back(server: Server):
    http = client.get_client()
    for path in ("/cookie", "/ok"):
        assert (await http.get(server.url + path)).status_code == 200
    session = client.get_session()
    for path in ("/cookie", "/ok"):
        async with session.get(server.url + path) as response:
            await response.read()
    assert server.cookies_seen == []


@pytest.mark.asyncio
async def test_gapwatch_ends_a_silent_stream_with_a_read_timeout(server: Server):
    session = client.get_session()
    async with session.get(server.url + "/stall?n=1") as response:
        watch = client.GapWatch(response, 0.4)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await response.content.readany() == b"ab"
        with pytest.raises(aiohttp.SocketTimeoutError):
            while await response.content.readany():
                pass
        waited = loop.time() - started
        watch.cancel()
    assert 0.35 <= waited < 3  # between gap and 1.25 x gap after the last byte, plus scheduling


@pytest.mark.asyncio
async def test_gapwatch_leaves_a_stream_that_keeps_coming(server: Server):
    session = client.get_session()
    async with session.get(server.url + "/drip?n=8&gap=0.1") as response:
        watch = client.GapWatch(response, 0.4)  # the whole reply takes longer than the gap
        body = b""
        while chunk := await response.content.readany():
            body += chunk
        watch.cancel()
    assert body == b"ab" * 8


@pytest.mark.asyncio
async def test_gapwatch_does_not_count_silence_while_the_reader_is_behind(server: Server):
    session = client.get_session()
    async with session.get(server.url + "/drip?n=4&gap=0") as response:
        watch = client.GapWatch(response, 0.2)
        await asyncio.sleep(0.6)  # the bytes sit unread for 3 gaps: the backend is not stalled
        body = b""
        while chunk := await response.content.readany():
            body += chunk
        watch.cancel()
    assert body == b"ab" * 4


def test_auth_headers():
    assert client.auth_headers("") == {}
    assert client.auth_headers("k") == {"Authorization": "Bearer k"}
