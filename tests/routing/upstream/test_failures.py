"""routing/upstream/failures: every kind of transport failure maps to the failure it really is
(through httpx's loose wrapping, by the cause chain), and each failure to its verdict.

The kinds: refused, connect timeout, no first byte, closed, malformed, anything else; raised by
aiohttp directly (the proxied request), by httpx over the aiohttp transport (probes), or by
both with one wrapped in the other. Real refusals and closes come from loopback sockets.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.upstream import failures
from routing.upstream.failures import UPSTREAM_ERRORS, Evidence, Failure, Verdict
from tests.conftest import free_port

AIOHTTP: list[tuple[BaseException, Failure]] = [
    (aiohttp.ServerDisconnectedError(), Failure.DISCONNECTED),
    (aiohttp.ClientOSError(errno.ECONNRESET, "reset by peer"), Failure.DISCONNECTED),
    (aiohttp.ConnectionTimeoutError("connect"), Failure.CONNECT_TIMEOUT),
    (aiohttp.SocketTimeoutError("read"), Failure.FIRST_BYTE_TIMEOUT),
    (TimeoutError(), Failure.FIRST_BYTE_TIMEOUT),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Failure.REFUSED),
    (aiohttp.ClientPayloadError("bad chunk"), Failure.PROTOCOL),
    (ValueError("anything else"), Failure.OTHER),
]
HTTPX: list[tuple[BaseException, Failure]] = [
    (httpx.ConnectTimeout("connect"), Failure.CONNECT_TIMEOUT),
    (httpx.PoolTimeout("pool"), Failure.CONNECT_TIMEOUT),
    (httpx.ConnectError("refused"), Failure.REFUSED),
    (httpx.ReadTimeout("read"), Failure.FIRST_BYTE_TIMEOUT),
    (httpx.RemoteProtocolError("closed"), Failure.DISCONNECTED),
    (httpx.DecodingError("gzip"), Failure.PROTOCOL),
    (httpx.LocalProtocolError("bad"), Failure.PROTOCOL),
]


@pytest.mark.parametrize("exc,expected", AIOHTTP + HTTPX, ids=lambda v: type(v).__name__)
def test_each_kind_of_exception_is_its_failure(exc: BaseException, expected: Failure):
    assert failures.classify(exc) is expected


@pytest.mark.parametrize("cause,expected", AIOHTTP[:-1], ids=lambda v: type(v).__name__)
def test_the_real_cause_wins_over_httpx_wrapping(cause: BaseException, expected: Failure):
    """The httpx-aiohttp transport reports a refused connection as ConnectTimeout: the cause decides."""
    wrapper = httpx.ConnectTimeout("mapped loosely")
    wrapper.__cause__ = cause
    assert failures.classify(wrapper) is expected


@given(st.sampled_from([e for e, _ in AIOHTTP + HTTPX]), st.integers(0, 4))
def test_any_chain_of_wrappers_keeps_the_cause(inner: BaseException, depth: int):
    """However deep the cause sits under plain wrappers, classify finds the same failure."""
    expected = failures.classify(inner)
    exc: BaseException = inner
    for _ in range(depth):
        outer = RuntimeError("wrapped")
        outer.__cause__ = exc
        exc = outer
    got = failures.classify(exc)
    if isinstance(inner, httpx.HTTPError) and depth:
        assert got is Failure.OTHER  # httpx errors are matched at the top only
    else:
        assert got is expected


def test_every_failure_has_a_verdict_and_only_a_first_byte_timeout_stays():
    for failure in Failure:
        judged = failures.verdict(failure)
        assert isinstance(judged, Verdict)
        assert judged.failover is (failure is not Failure.FIRST_BYTE_TIMEOUT)
    assert failures.verdict(Failure.REFUSED).evidence is Evidence.STRONG
    assert failures.verdict(Failure.CONNECT_TIMEOUT).evidence is Evidence.STRONG
    assert failures.verdict(Failure.FIRST_BYTE_TIMEOUT).evidence is Evidence.NONE


@given(st.integers(100, 599))
def test_status_verdicts(status: int):
    judged = failures.status_verdict(status)
    if status < 500:
        assert judged == Verdict(Evidence.NONE, failover=False)
    else:
        assert judged.evidence is Evidence.WEAK and judged.failover is (status in (502, 503))


@pytest.mark.parametrize(
    "exc,reason",
    [
        (TimeoutError(), "stalled between chunks"),
        (aiohttp.SocketTimeoutError("gap"), "stalled between chunks"),
        (aiohttp.ServerDisconnectedError(), "closed the connection mid-reply"),
        (aiohttp.ClientPayloadError("truncated"), "closed the connection mid-reply"),
        (ValueError("x"), Failure.OTHER.value),
    ],
    ids=lambda v: type(v).__name__,
)
def test_midstream_reasons(exc: BaseException, reason: str):
    assert failures.midstream_reason(exc) == reason


def test_upstream_errors_cover_every_transport_failure():
    for exc, _ in AIOHTTP[:-1]:
        assert isinstance(exc, UPSTREAM_ERRORS)


# -- real sockets ------------------------------------------------------------------------------
@pytest.fixture
def closing_server() -> Iterator[int]:
    """Accepts connections and closes each at once, before any reply byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    sock.close()


@pytest.mark.asyncio
async def test_a_refused_connect_on_loopback_is_refused_not_closed_before_reply():
    url = f"http://127.0.0.1:{free_port()}/"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError) as caught:
            await session.get(url)
    assert failures.classify(caught.value) is Failure.REFUSED
    assert not failures.closed_before_reply(caught.value)
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.HTTPError) as caught_httpx:
            await client.get(url)
    assert failures.classify(caught_httpx.value) is Failure.REFUSED


@pytest.mark.asyncio
async def test_a_connection_closed_before_the_reply_is_disconnected(closing_server: int):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError) as caught:
            await session.post(f"http://127.0.0.1:{closing_server}/api/chat", data=b"{}")
    assert failures.classify(caught.value) is Failure.DISCONNECTED
    assert failures.closed_before_reply(caught.value)
    assert failures.verdict(failures.classify(caught.value)).failover
