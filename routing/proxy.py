"""The one forwarding path every routed request takes: select, reserve, send, relay, account.

Both protocols and every route come through `forward()`; only the `Planner` differs (which
url, which body, how to read the reply). Slots are released in `finally` on every path,
including cancellation when the client goes away; a streaming reply also releases through
`ProxyStream.close()`, which the lean handler awaits whether or not the stream ever ran.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from routing import caches, fleet, metrics, upstream
from routing.board import Candidate, Lease, QueueFull, QueueTimeout, board
from routing.cluster import cluster
from routing.errors import ApiError
from routing.names import model_key
from routing.relays import BodyReader, Relay
from stats.recorder import recorder

log = logging.getLogger("routing.proxy")

MAX_ERROR_BODY = 64 * 1024


@dataclass(slots=True)
class Attempt:
    """One upstream request for one chosen candidate."""

    url: str
    body: bytes
    relay: Callable[[], Relay]  # for streaming replies
    read_body: BodyReader  # for whole replies
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    counted: bool = True  # False for replies that carry no token counts (legacy embeddings)


Planner = Callable[[Candidate], Attempt]


async def forward(
    request_path: str,
    *,
    model: str,
    plan: Planner,
    metered: bool = True,
) -> HttpResponse | StreamingHttpResponse:
    """Route one request. `metered=False` is for metadata calls (show) that take no slot."""
    lookup = await fleet.candidates_for(model)
    if not lookup.candidates:
        if lookup.failing_with_model:
            raise ApiError(503, f"every endpoint serving '{model}' is failing; try again", retry_after=5)
        if lookup.reachable == 0:
            raise ApiError(503, "no endpoint is reachable", retry_after=5)
        raise ApiError(404, f"model '{model}' not found", code="model_not_found")
    key = model_key(model)
    candidates = list(lookup.candidates)
    failure = "no endpoint answered"
    for _ in range(settings.ROUTER_MAX_RETRIES + 1):
        lease = await _acquire(key, model, candidates) if metered else board.unmetered(key, candidates)
        attempt = plan(lease.candidate)
        if not metered:
            attempt.counted = False
        started = time.perf_counter()
        try:
            response = await _send(lease, attempt)
        except BaseException as exc:
            lease.release()
            if not isinstance(exc, UPSTREAM_ERRORS):
                raise
            failure = upstream.classify(exc).value
            _give_up_on(lease.candidate, candidates, failure)
        else:
            if response.status < 500:
                # From here on bytes may reach the client: never retry.
                metrics.first_byte(request_path, time.perf_counter() - started)
                try:
                    return await _reply(request_path, lease, attempt, response)
                except BaseException:
                    response.close()  # cancelled before the stream took it over
                    lease.release()
                    raise
            failure = f"HTTP {response.status}: {await _error_text(response)}"
            lease.release()
            _give_up_on(lease.candidate, candidates, failure)
        if not candidates:
            break
        metrics.failovers.inc()
    raise ApiError(502, f"upstream failed for model '{model}': {failure}", retry_after=5)


def _give_up_on(cand: Candidate, candidates: list[Candidate], reason: str) -> None:
    fleet.mark_failing(cand.endpoint, reason)
    candidates[:] = [c for c in candidates if c.endpoint.id != cand.endpoint.id]


async def _acquire(key: str, model: str, candidates: list[Candidate]) -> Lease:
    waited = time.perf_counter()
    deadline = waited + settings.ROUTER_QUEUE_TIMEOUT
    try:
        lease = await board.acquire(
            key, candidates, timeout=settings.ROUTER_QUEUE_TIMEOUT, queue_max=settings.ROUTER_QUEUE_MAX
        )
        if cluster.enabled():
            lease = await _claim_in_cluster(lease, key, candidates, deadline)
        metrics.queue_wait(time.perf_counter() - waited)
        return lease
    except QueueFull:
        raise ApiError(503, "the router's queue is full; try again shortly", retry_after=1) from None
    except QueueTimeout:
        raise ApiError(
            503, f"every endpoint serving '{model}' stayed busy; try again", retry_after=5
        ) from None


async def _claim_in_cluster(lease: Lease, key: str, candidates: list[Candidate], deadline: float) -> Lease:
    """Also hold the slot across router processes; try other candidates, then wait."""
    backoff = 0.01
    full: set[int] = set()
    while True:
        ep = lease.endpoint
        try:
            member = await cluster.claim(ep.url, key, ep.limit)
        except BaseException:
            lease.release()  # cancelled while asking Redis (a claim made meanwhile expires)
            raise
        if member is not None:
            if member:
                lease.on_release(functools.partial(cluster.free, member))
            return lease
        lease.release()  # full elsewhere in the cluster: give the local slot back
        full.add(ep.id)
        others = [c for c in candidates if c.endpoint.id not in full]
        if not others:
            full.clear()
            others = candidates
            if time.perf_counter() + backoff > deadline:
                raise QueueTimeout()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.2)
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise QueueTimeout()
        lease = await board.acquire(key, others, timeout=remaining, queue_max=settings.ROUTER_QUEUE_MAX)


UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


async def _send(lease: Lease, attempt: Attempt) -> aiohttp.ClientResponse:
    """Send the request and wait for the reply's head; the body is read by the caller."""
    ep = lease.endpoint
    headers = {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        **upstream.auth_headers(ep.api_key),
        **attempt.headers,
    }
    response = await upstream.get_session().request(
        attempt.method,
        attempt.url,
        data=attempt.body,
        headers=headers,
        timeout=upstream.proxy_timeout(),
        allow_redirects=False,
    )
    upstream.set_gap_timeout(response, settings.ROUTER_READ_TIMEOUT)
    return response


async def _error_text(response: aiohttp.ClientResponse) -> str:
    reason = response.reason or ""
    try:
        async with asyncio.timeout(settings.ROUTER_PROBE_TIMEOUT):
            body = await response.content.read(MAX_ERROR_BODY)
        return body[:500].decode("utf-8", "replace").strip() or reason
    except UPSTREAM_ERRORS:
        return reason
    finally:
        response.close()


async def _reply(
    path: str, lease: Lease, attempt: Attempt, response: aiohttp.ClientResponse
) -> HttpResponse | StreamingHttpResponse:
    ep = lease.endpoint
    status = response.status
    if status == 404:
        caches.advertised.invalidate(ep.id)  # it no longer has the model we thought it had
    if attempt.stream and status == 200:
        stream = ProxyStream(lease, response, attempt.relay(), path, counted=attempt.counted)
        streaming = ProxyStreamingResponse(stream, content_type=stream.relay.content_type)
        streaming["X-Router-Endpoint"] = ep.name
        return streaming
    try:
        body = await response.read()
    except UPSTREAM_ERRORS as exc:
        response.close()
        lease.release()
        fleet.mark_failing(ep, upstream.midstream_reason(exc))
        if attempt.counted:
            recorder.incomplete(ep.url, lease.model)
        raise ApiError(502, f"upstream closed before its reply was complete ({ep.name})") from None
    finally:
        response.release()
        lease.release()
    if status == 200:
        out, counts = attempt.read_body(body)
        if attempt.counted:
            if counts is not None:
                recorder.record(ep.url, lease.model, counts)
            else:
                recorder.incomplete(ep.url, lease.model)
    else:
        out = body
    reply = HttpResponse(
        out, status=status, content_type=response.headers.get("Content-Type", "application/json")
    )
    reply["X-Router-Endpoint"] = ep.name
    return reply


class ProxyStream:
    """Relays one upstream stream; `close()` is idempotent, synchronous and does the accounting."""

    def __init__(
        self, lease: Lease, response: aiohttp.ClientResponse, relay: Relay, path: str, *, counted: bool
    ) -> None:
        self.lease = lease
        self.counted = counted
        self.response = response
        self.relay = relay
        self.path = path
        self.closed = False
        self.finished = False  # the upstream ended normally
        self.gap_watch = upstream.GapWatch(response, settings.ROUTER_READ_TIMEOUT)

    async def chunks(self) -> AsyncIterator[bytes]:
        read = self.response.content.readany
        feed = self.relay.feed
        try:
            while chunk := await read():
                out = feed(chunk)
                if out:
                    yield out
            self.finished = True
            tail = self.relay.finish()
            if tail:
                yield tail
        except UPSTREAM_ERRORS as exc:
            reason = upstream.midstream_reason(exc)
            fleet.mark_failing(self.lease.endpoint, reason)
            yield self.relay.error_chunk(f"upstream {self.lease.endpoint.name}: {reason}")
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.gap_watch.cancel()
        ep, model = self.lease.endpoint, self.lease.model
        try:
            if self.finished:
                self.response.release()  # the connection goes back to the pool
            else:
                self.response.close()  # cut off: drop the connection, cancelling the upstream
        finally:
            self.lease.release()
            counts = self.relay.counts() if self.finished else None
            if not self.counted:
                pass
            elif counts is not None:
                recorder.record(ep.url, model, counts)
            else:
                recorder.incomplete(ep.url, model)


class ProxyStreamingResponse(StreamingHttpResponse):
    """A streaming reply whose upstream is closed and slot released even if never iterated."""

    def __init__(self, stream: ProxyStream, **kwargs: object) -> None:
        self.proxy_stream = stream
        self.chunks = stream.chunks()
        super().__init__(self.chunks, **kwargs)  # type: ignore[arg-type]
        # Django's own handler closes responses synchronously: close the stream there too.
        self._resource_closers.append(stream.close)  # type: ignore[attr-defined]

    async def finish(self) -> None:
        await self.chunks.aclose()  # type: ignore[attr-defined]
        self.proxy_stream.close()
