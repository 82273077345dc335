"""All upstream HTTP: one pooled aiohttp session per running event loop, and error classification.

The proxied requests (the hot path) use the session directly: measured side by side,
httpx's request layer on top of it cost about a fifth of the router's CPU per request
(docs/benchmarks.md). Probes and fan-out calls, where convenience matters more than
microseconds, use an httpx client over the same session (httpx-aiohttp transport), so
there is still one connection pool per loop. That transport maps aiohttp errors loosely
(a refused connection arrives as ConnectTimeout), so failover decisions use `classify()`,
which looks at the real cause.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

import aiohttp
import httpx
from django.conf import settings
from httpx_aiohttp import AiohttpTransport

TransportFactory = Callable[[], httpx.AsyncBaseTransport]

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)
_fresh: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)
_transport_factory: TransportFactory | None = None
# Seconds an idle pooled connection is kept (see get_session).
KEEPALIVE_IDLE = 4.0


def get_session() -> aiohttp.ClientSession:
    """The aiohttp session (connection pool) of the running loop, created on first use."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        # limit=0: the router's own slot accounting bounds concurrency per backend, a
        # connector cap would only add a second, invisible queue (aiohttp's default is 100).
        # keepalive_timeout: an idle pooled connection is dropped after KEEPALIVE_IDLE s, below
        # the idle close of common servers (llama.cpp's llama-server closes after ~5 s), so the
        # router seldom sends on a connection the server is closing; when it still happens,
        # proxy._send retries once on a fresh connection (`fresh_session`).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_IDLE, ttl_dns_cache=60)
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through as the backend sent them
            cookie_jar=aiohttp.DummyCookieJar(),  # one session serves every user: no cookies
        )
        _sessions[loop] = session
    return session


def fresh_session() -> aiohttp.ClientSession:
    """A session whose every request opens its own connection and closes it after (no pool):
    for the one retry after a pooled connection closed before any reply byte."""
    loop = asyncio.get_running_loop()
    session = _fresh.get(loop)
    if session is None or session.closed:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True, ttl_dns_cache=60),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        _fresh[loop] = session
    return session


def default_transport() -> httpx.AsyncBaseTransport:
    return AiohttpTransport(client=get_session())


_proxy_timeouts: tuple[tuple[float, float], aiohttp.ClientTimeout] | None = None


def proxy_timeout() -> aiohttp.ClientTimeout:
    """Connect, and the wait for the reply's head (long: a model may be loading)."""
    global _proxy_timeouts
    key = (settings.ROUTER_CONNECT_TIMEOUT, settings.ROUTER_FIRST_BYTE_TIMEOUT)
    if _proxy_timeouts is None or _proxy_timeouts[0] != key:
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=key[0], sock_read=key[1])
        _proxy_timeouts = (key, timeout)
    return _proxy_timeouts[1]


def set_gap_timeout(response: aiohttp.ClientResponse, seconds: float | None) -> None:
    """Once the head arrived, the socket read timeout becomes the allowed gap while a whole
    reply's body is read (aiohttp re-arms it on every read); None turns it off (a stream is
    watched by GapWatch instead). The next request on the connection sets its own."""
    connection = response.connection
    if connection is not None and connection.protocol is not None:
        connection.protocol.read_timeout = seconds
        if not response.content.is_eof():
            connection.protocol.start_timeout()  # re-arm now: the old timer had the long wait


class GapWatch:
    """Ends a streamed reply whose backend went silent for `gap` seconds, with one timer per
    reply. aiohttp's own socket read timeout cancels a timer and makes a new one on every
    read, which for a stream is every token.

    The timer looks every gap/4 whether bytes arrived since it last looked. Silence only
    counts while the router is waiting for bytes: when some are buffered and unread (the
    client is slow and the upstream paused by flow control), the backend is not stalled.
    A stall fails the pending read with aiohttp's own SocketTimeoutError, so it is reported
    as any read timeout is; detection comes between gap and 1.25 x gap after the last byte.
    """

    __slots__ = ("_content", "_gap", "_handle", "_loop", "_quiet_since", "_seen")

    def __init__(self, response: aiohttp.ClientResponse, gap: float) -> None:
        set_gap_timeout(response, None)  # no per-read timer from here on
        self._content = response.content
        self._gap = gap
        self._loop = asyncio.get_running_loop()
        self._seen = self._content.total_bytes
        self._quiet_since = self._loop.time()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(gap / 4, self._check)

    def _check(self) -> None:
        content, now = self._content, self._loop.time()
        if content.is_eof() or content.exception() is not None:
            self._handle = None
            return
        if content.total_bytes != self._seen or content._size > 0:  # progress, or we are behind
            self._seen = content.total_bytes
            self._quiet_since = now
        elif now - self._quiet_since >= self._gap:
            self._handle = None
            content.set_exception(aiohttp.SocketTimeoutError(f"no data from the backend for {self._gap:g} s"))
            return
        self._handle = self._loop.call_later(self._gap / 4, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def set_transport_factory(factory: TransportFactory | None) -> None:
    """Tests swap the transport (e.g. httpx.MockTransport); None restores the default."""
    global _transport_factory
    _transport_factory = factory
    _clients.clear()


def timeouts(*, first_byte: float | None = None) -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.ROUTER_CONNECT_TIMEOUT,
        read=first_byte if first_byte is not None else settings.ROUTER_FIRST_BYTE_TIMEOUT,
        write=settings.ROUTER_READ_TIMEOUT,
        pool=settings.ROUTER_CONNECT_TIMEOUT,
    )


class _NoCookies(httpx.Cookies):
    """One client serves every user, so it keeps no backend's cookies (httpx would store them
    and send them with everyone's later requests); not parsing them saves ~45 us per reply."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def get_client() -> httpx.AsyncClient:
    """The client of the running event loop, created on first use (never at import time)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        transport = (_transport_factory or default_transport)()
        client = httpx.AsyncClient(transport=transport, timeout=timeouts(), trust_env=False)
        client._cookies = _NoCookies()  # (the public setter would wrap it into a plain Cookies)
        _clients[loop] = client
    return client


async def close_client() -> None:
    """Close this loop's client and session inside its loop (at shutdown)."""
    loop = asyncio.get_running_loop()
    client = _clients.pop(loop, None)
    if client is not None:
        await client.aclose()
    for sessions in (_sessions, _fresh):
        session = sessions.pop(loop, None)
        if session is not None and not session.closed:
            await session.close()


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
