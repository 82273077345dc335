"""What an upstream failure says about the server: its kind, and the verdict (evidence, retry).

`classify` looks at the real cause of an exception (the httpx-aiohttp transport maps aiohttp errors
loosely); `verdict`/`status_verdict` turn a failure or an HTTP status into what the breaker and the
forwarding path do with it.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import aiohttp
import httpx


class Failure(enum.Enum):
    """Why an upstream attempt failed before its first byte (see `verdict` for what each means)."""

    REFUSED = "connection refused"
    CONNECT_TIMEOUT = "connect timeout"
    FIRST_BYTE_TIMEOUT = "no first byte in time"
    DISCONNECTED = "closed the connection"
    PROTOCOL = "malformed response"
    OTHER = "request failed"


def classify(exc: BaseException) -> Failure:
    """Map an exception from either transport to what really happened."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and not isinstance(
            seen, aiohttp.ClientConnectorError
        ):
            return Failure.DISCONNECTED
        if isinstance(seen, aiohttp.ConnectionTimeoutError):
            return Failure.CONNECT_TIMEOUT
        if isinstance(seen, aiohttp.ClientConnectorError | ConnectionRefusedError):
            return Failure.REFUSED
        if isinstance(seen, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
            return Failure.FIRST_BYTE_TIMEOUT
        if isinstance(seen, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
            return Failure.PROTOCOL
        seen = seen.__cause__
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return Failure.CONNECT_TIMEOUT
    if isinstance(exc, httpx.ConnectError):
        return Failure.REFUSED
    if isinstance(exc, httpx.TimeoutException):
        return Failure.FIRST_BYTE_TIMEOUT
    if isinstance(exc, httpx.RemoteProtocolError):
        return Failure.DISCONNECTED
    if isinstance(exc, httpx.DecodingError | httpx.ProtocolError):
        return Failure.PROTOCOL
    return Failure.OTHER


def midstream_reason(exc: BaseException) -> str:
    """Why a reply broke off after its headers: a stall, or the backend going away."""
    failure = classify(exc)
    if isinstance(exc, TimeoutError) or failure in (Failure.FIRST_BYTE_TIMEOUT, Failure.CONNECT_TIMEOUT):
        return "stalled between chunks"
    if failure in (Failure.DISCONNECTED, Failure.PROTOCOL, Failure.REFUSED):
        return "closed the connection mid-reply"
    return failure.value


def closed_before_reply(exc: BaseException) -> bool:
    """The connection closed or was reset before any reply byte, after it was established
    (not a refused or timed-out connect): what a pooled connection the server closed while
    idle looks like. aiohttp itself retries this only for idempotent methods."""
    return isinstance(exc, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
    )


class Evidence(enum.Enum):
    """What a failure says about the server (routing/fleet/breaker.py weighs it)."""

    NONE = "none"  # about this request only
    WEAK = "weak"  # could be this request; counts when it repeats across requests
    STRONG = "strong"  # about the server: it leaves rotation at once


@dataclass(frozen=True, slots=True)
class Verdict:
    evidence: Evidence
    failover: bool  # the request may go to another server: it cannot have run here


# A failure before the reply's head, after the one fresh-connection retry of a closed one.
_FAILURE_VERDICTS = {
    Failure.REFUSED: Verdict(Evidence.STRONG, failover=True),
    Failure.CONNECT_TIMEOUT: Verdict(Evidence.STRONG, failover=True),
    # The work may be running there: never resent elsewhere. Weak: one request may be slow,
    # but a server that stalls request after request leaves rotation (it may answer probes).
    Failure.FIRST_BYTE_TIMEOUT: Verdict(Evidence.WEAK, failover=False),
    # Closed twice without a reply, or a malformed head: nothing was answered, so trying
    # another server cannot double an answer; weak, as one request may crash a server.
    Failure.DISCONNECTED: Verdict(Evidence.WEAK, failover=True),
    Failure.PROTOCOL: Verdict(Evidence.WEAK, failover=True),
    Failure.OTHER: Verdict(Evidence.WEAK, failover=True),
}


def verdict(failure: Failure) -> Verdict:
    return _FAILURE_VERDICTS[failure]


def status_verdict(status: int) -> Verdict:
    """A complete reply the server sent normally (its error body read to the end).

    Below 500 it is about the request. 502 and 503 say the server did not take the work
    (overloaded, or a proxy in front of it could not reach it): weak evidence, and another
    server may try. Every other 5xx (500 "image input is not supported", 501, a 504 from a
    proxy whose backend may still be working) is the server's normal answer about this
    request: it goes back to this client alone and is no evidence either way, so clients
    sending bad requests cannot take the server out for others (issue 11 section 3). A 5xx
    whose body is cut or stalled is a broken reply: the caller counts it as weak evidence."""
    if status in (502, 503):
        return Verdict(Evidence.WEAK, failover=True)
    return Verdict(Evidence.NONE, failover=False)


UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
