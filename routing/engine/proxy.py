"""The one forwarding path every routed request takes: select, reserve, send, relay, account.

Both protocols and every route come through `forward()`; only the `Planner` differs (which
url, which body, how to read the reply).

Slot ownership: from the moment `_acquire` returns a lease, `forward` owns it in one
try/finally that releases it unless a `ProxyStream` took it over (the lean handler then
closes the stream whether or not it ever ran). Whatever raises in between (the planner,
the send, reading the reply, cancellation) the slot, and its cluster claim, come back.

Failures are judged by what they say about the server (upstream.verdict/status_verdict,
routing/fleet/breaker.py): a pooled connection that closed before any reply byte is retried once
on a fresh connection to the same server; a 4xx and a complete normal 5xx (not 502/503) go
back to this client alone and are no evidence about the server; a first-byte timeout fails
this request alone (504), never resent; refused and timed-out connects open the endpoint's
breaker at once; 502/503, first-byte timeouts and cut or stalled replies only when they
repeat across requests. Every error about a server carries `X-Router-Endpoint`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from routing.auth.principal import Principal, require_model
from routing.core.errors import ApiError, error_response, in_route_shape
from routing.core.names import model_key
from routing.engine.accounting import sinks
from routing.engine.affinity_shared import shared_affinity
from routing.engine.attempt import Attempt, Planner, Refuse, Relay, Retry
from routing.engine.board import Lease, QueueFull, QueueTimeout, board
from routing.engine.cluster import cluster
from routing.fleet import caches, health
from routing.fleet import candidates as fleet_candidates
from routing.fleet.breaker import breakers
from routing.fleet.candidates import Candidate
from routing.fleet.refusals import refusals
from routing.fleet.registry import EndpointInfo
from routing.observability import metrics
from routing.upstream import client, failures
from routing.upstream.failures import UPSTREAM_ERRORS

log = logging.getLogger("routing.proxy")

MAX_ERROR_BODY = 64 * 1024
# Error statuses an attempt's `recover` hook is shown: 400/413/422 (a prompt too long, an image
# a model cannot see: llama.cpp, vLLM), 500 (Ollama's image error), 404/501 (no rerank there).
RECOVERABLE = frozenset({400, 404, 413, 422, 500, 501})
MAX_RECOVERIES = 3  # per attempt: each hook retries each kind of fix once; this bounds a bad hook


async def forward(
    request_path: str,
    *,
    model: str,
    plan: Planner,
    principal: Principal,
    metered: bool = True,
    accept: Callable[[Candidate], ApiError | None] | None = None,
    affinity: str | None = None,
) -> HttpResponse | StreamingHttpResponse:
    """Route one request for `principal` (who it is accounted to). `metered=False` is for
    metadata calls (show) that take no slot. `accept` (rerank) leaves out the candidates it
    answers an ApiError for; when it leaves none, the first such error is raised. A server
    whose attempt answers `Refuse` is passed over; when every tried one refused, the
    refusal's error is raised. affinity: the conversation's key for prompt-cache affinity
    (routing/engine/affinity.py), None: none.

    The principal's name and priority place a queued request in the model's queue
    (routing/engine/fair_queue.py).

    Raises ApiError: 403 (the principal's key may not use the model), 404 (no endpoint has the
    model), 503 (none reachable or all busy), 400 (the planner could not build the upstream
    request), 504 (first-byte timeout), 502 (every tried server failed before replying)."""
    require_model(principal, model)
    lookup = await fleet_candidates.candidates_for(model)
    if not lookup.candidates:
        if lookup.failing_with_model:
            raise ApiError(503, f"every endpoint serving '{model}' is failing; try again", retry_after=5)
        if lookup.reachable == 0:
            raise ApiError(503, "no endpoint is reachable", retry_after=5)
        raise ApiError(404, f"model '{model}' not found", code="model_not_found")
    key = model_key(model)
    candidates = _accepted(lookup.candidates, accept)
    failure = "no endpoint answered"
    tried = ""
    refused: ApiError | None = None  # set while every failure so far was a refusal
    for _ in range(settings.ROUTER_MAX_RETRIES + 1):
        lease = (
            await _acquire(key, model, candidates, principal, affinity)
            if metered
            else board.unmetered(key, candidates)
        )
        handed_over = False
        try:
            outcome = await _attempt(request_path, lease, plan, metered, principal)
            if isinstance(outcome, ApiError):  # this server cannot serve it (Refuse)
                refused = outcome if refused is not None or not tried else None
                failure = outcome.message
            elif not isinstance(outcome, str):
                handed_over = isinstance(outcome, ProxyStreamingResponse)  # its stream owns the slot
                return outcome
            else:
                failure, refused = outcome, None
            tried = lease.endpoint.name
        finally:
            if not handed_over:
                lease.release()
        candidates[:] = [c for c in candidates if c.endpoint.id != lease.endpoint.id]
        if not candidates:
            break
        metrics.failovers.inc()
    if refused is not None:
        raise refused
    raise ApiError(
        502,
        f"upstream failed for model '{model}': {failure}",
        retry_after=5,
        headers=_named(tried),
    )


def _accepted(
    found: list[Candidate], accept: Callable[[Candidate], ApiError | None] | None
) -> list[Candidate]:
    if accept is None:
        return list(found)
    kept: list[Candidate] = []
    first: ApiError | None = None
    for cand in found:
        why = accept(cand)
        if why is None:
            kept.append(cand)
        elif first is None:
            first = why
    if not kept and first is not None:
        raise first
    return kept


def _named(endpoint_name: str) -> dict[str, str]:
    """The header naming the server an error is about (metrics and the access log read it)."""
    return {"X-Router-Endpoint": endpoint_name} if endpoint_name else {}


def _plan(plan: Planner, cand: Candidate) -> Attempt:
    """The planner's Attempt; anything it raises other than ApiError means it could not
    express this request for this server: a 400 for this request alone."""
    try:
        return plan(cand)
    except ApiError:
        raise
    except Exception as exc:
        log.warning("request not sendable to %s: %s: %s", cand.endpoint.name, type(exc).__name__, exc)
        raise ApiError(400, f"the request cannot be sent as given: {exc}"[:500]) from None


async def _attempt(
    path: str, lease: Lease, plan: Planner, metered: bool, principal: Principal
) -> HttpResponse | StreamingHttpResponse | str | ApiError:
    """One server's try: the reply, why it failed in a way that allows failover (str), or
    the error to give when no server can serve it (ApiError, from a `Refuse`). The caller
    owns the lease; this owns the upstream response until a reply takes it. The attempt's
    `reply_headers` go on whatever reply this server's answer becomes."""
    attempt = _plan(plan, lease.candidate)
    outcome = await _try(path, lease, attempt, metered, principal)
    if isinstance(outcome, (HttpResponse, StreamingHttpResponse)):
        for name, value in attempt.reply_headers.items():
            outcome[name] = value
    return outcome


async def _try(
    path: str, lease: Lease, attempt: Attempt, metered: bool, principal: Principal
) -> HttpResponse | StreamingHttpResponse | str | ApiError:
    ep = lease.endpoint
    if not metered:
        attempt.counted = False
    if attempt.fallback_body is not None and ep.id in refusals:
        attempt.body, attempt.fallback_body = attempt.fallback_body(), None
    started = time.perf_counter()
    recoveries = 0
    while True:
        try:
            response = await _send(lease, attempt)
        except UPSTREAM_ERRORS as exc:
            failure = failures.classify(exc)
            judged = failures.verdict(failure)
            if not judged.failover:  # a first-byte timeout: the work may be running there
                if judged.evidence is not failures.Evidence.NONE:  # weak: counts when it repeats
                    health.server_failed(ep, failure.value, strong=False)
                if attempt.counted:
                    sinks.incomplete(principal, ep.url, lease.model)
                raise ApiError(
                    504,
                    f"'{ep.name}' sent no reply within {settings.ROUTER_FIRST_BYTE_TIMEOUT:g} s; "
                    "not resent elsewhere, as it may still be working on it",
                    headers=_named(ep.name),
                ) from None
            health.server_failed(ep, failure.value, strong=judged.evidence is failures.Evidence.STRONG)
            return failure.value
        try:
            status = response.status
            refusing_field = status in (400, 422) and attempt.fallback_body is not None
            recoverable = (
                attempt.recover is not None and status in RECOVERABLE and recoveries < MAX_RECOVERIES
            )
            if status >= 500 or refusing_field or recoverable:
                body, complete = await _read_error_body(response)
                if refusing_field and complete and _refuses_added_field(body) and attempt.fallback_body:
                    log.info("endpoint %s refuses stream_options: sent without it from now on", ep.name)
                    refusals.add(ep.id)
                    attempt.body, attempt.fallback_body = attempt.fallback_body(), None
                    continue  # the same request again, on the same server and slot
                hook = attempt.recover if recoverable and complete else None
                verdict = hook(attempt, status, body) if hook is not None else None
                if isinstance(verdict, Retry):
                    recoveries += 1
                    breakers.succeeded(ep.id)  # it answered normally, about this request
                    attempt.body = verdict.body
                    attempt.reply_headers.update(verdict.headers)
                    continue  # the changed request again, on the same server and slot
                if isinstance(verdict, Refuse):
                    breakers.succeeded(ep.id)
                    return verdict.error
                return _error_outcome(path, ep, status, body, complete, response.reason)
            lease.first_byte = time.perf_counter() - started  # the board averages it per endpoint and model
            metrics.first_byte(path, lease.first_byte)
            return await _reply(path, lease, attempt, response, principal)
        except BaseException:
            response.close()  # never handed to a reply: drop the connection
            raise


def _error_outcome(
    path: str, ep: EndpointInfo, status: int, body: bytes, complete: bool, reason: str | None
) -> HttpResponse | str:
    """An error reply already read: a failover (str, for 502/503) or the client's reply."""
    if status >= 500:
        judged = failures.status_verdict(status)
        if judged.evidence is not failures.Evidence.NONE or not complete:
            health.server_failed(ep, f"HTTP {status}", strong=False)
        if judged.failover:
            return f"HTTP {status}: {_error_message(body, reason)}"
    else:
        if status == 404:
            caches.advertised.invalidate(ep.id)  # it no longer has the model we thought it had
        breakers.succeeded(ep.id)  # it answered normally, about this request
    return _error_reply(path, ep.name, status, body, reason)


def _refuses_added_field(body: bytes) -> bool:
    """A 400/422 about the `stream_options` the router added (servers that reject unknown
    parameters name it, e.g. "Unrecognized request argument supplied: stream_options")."""
    return b"stream_options" in body.lower()


async def _acquire(
    key: str, model: str, candidates: list[Candidate], principal: Principal, affinity: str | None
) -> Lease:
    waited = time.perf_counter()
    deadline = waited + settings.ROUTER_QUEUE_TIMEOUT
    try:
        if affinity is not None and shared_affinity.enabled:
            await shared_affinity.prefetch(key, affinity)  # one Redis read, only on a local miss
        lease = await board.acquire(
            key,
            candidates,
            timeout=settings.ROUTER_QUEUE_TIMEOUT,
            queue_max=settings.ROUTER_QUEUE_MAX,
            client=principal.name,
            priority=principal.priority,
            affinity=affinity,
        )
        if cluster.enabled():
            lease = await _claim_in_cluster(lease, key, candidates, deadline, principal, affinity)
        if affinity is not None and shared_affinity.enabled:
            shared_affinity.flush()  # what the pick remembered, to Redis in the background
        metrics.queue_wait(time.perf_counter() - waited)
        return lease
    except QueueFull:
        raise ApiError(503, "the router's queue is full; try again shortly", retry_after=1) from None
    except QueueTimeout:
        raise ApiError(
            503, f"every endpoint serving '{model}' stayed busy; try again", retry_after=5
        ) from None


async def _claim_in_cluster(
    lease: Lease,
    key: str,
    candidates: list[Candidate],
    deadline: float,
    principal: Principal,
    affinity: str | None = None,
) -> Lease:
    """Also hold the slot across router processes; try other candidates, then wait.
    Owns `lease` (and each later one) until it returns it: any exception releases it."""
    backoff = 0.01
    full: set[int] = set()
    try:
        while True:
            ep = lease.endpoint
            member = await cluster.claim(ep.url, key, ep.limit)  # cancelled meanwhile: it expires
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
            lease = await board.acquire(
                key,
                others,
                timeout=remaining,
                queue_max=settings.ROUTER_QUEUE_MAX,
                client=principal.name,
                priority=principal.priority,
                affinity=affinity,
            )
    except BaseException:
        lease.release()  # idempotent: a lease already given back stays given back
        raise


async def _send(lease: Lease, attempt: Attempt) -> aiohttp.ClientResponse:
    """Send the request and wait for the reply's head; the body is read by the caller.
    A connection that closes before any reply byte (a pooled one the server closed while
    idle) is retried once at once on a fresh connection to the same server."""
    ep = lease.endpoint
    headers = {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        **client.auth_headers(ep.api_key),
        **attempt.headers,
    }
    try:
        response = await _request(client.get_session(), attempt, headers)
    except UPSTREAM_ERRORS as exc:
        if not failures.closed_before_reply(exc):
            raise
        metrics.fresh_retries.inc()
        response = await _request(client.fresh_session(), attempt, headers)
    client.set_gap_timeout(response, settings.ROUTER_READ_TIMEOUT)
    return response


async def _request(
    session: aiohttp.ClientSession, attempt: Attempt, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    return await session.request(
        attempt.method,
        attempt.url,
        data=attempt.body,
        headers=headers,
        timeout=client.proxy_timeout(),
        allow_redirects=False,
    )


async def _read_error(response: aiohttp.ClientResponse) -> bytes:
    """Up to MAX_ERROR_BODY bytes of an error reply; releases the response."""
    return (await _read_error_body(response))[0]


async def _read_error_body(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Up to MAX_ERROR_BODY bytes of an error reply, and whether it arrived whole (False: the
    server cut or stalled it, which says something about the server); releases the response."""
    try:
        async with asyncio.timeout(settings.ROUTER_PROBE_TIMEOUT):
            return await response.content.read(MAX_ERROR_BODY), True
    except UPSTREAM_ERRORS:
        return b"", False
    finally:
        response.close()


def _error_message(body: bytes, reason: str | None) -> str:
    """The message of an error body in either protocol's shape, or its text."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return body[:500].decode("utf-8", "replace").strip() or reason or "error"


def _error_reply(path: str, ep_name: str, status: int, body: bytes, reason: str | None) -> HttpResponse:
    """An error the server sent about this request, for this client alone, in the route's
    shape: passed as is when it already has it, rewritten otherwise."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if in_route_shape(path, data):
        reply = HttpResponse(body, status=status, content_type="application/json")
    else:
        reply = error_response(path, ApiError(status, _error_message(body, reason)))
    reply["X-Router-Endpoint"] = ep_name
    return reply


async def _reply(
    path: str, lease: Lease, attempt: Attempt, response: aiohttp.ClientResponse, principal: Principal
) -> HttpResponse | StreamingHttpResponse:
    ep = lease.endpoint
    status = response.status
    if status == 404:
        caches.advertised.invalidate(ep.id)  # it no longer has the model we thought it had
    if status >= 400:
        error = await _read_error(response)
        breakers.succeeded(ep.id)  # it answered normally, about this request
        return _error_reply(path, ep.name, status, error, response.reason)
    if attempt.stream and status == 200:
        try:
            relay = attempt.relay()
        except Exception as exc:
            raise ApiError(
                502, f"cannot relay the reply of {ep.name}: {exc}"[:500], headers=_named(ep.name)
            ) from None
        stream = ProxyStream(lease, response, relay, path, counted=attempt.counted, principal=principal)
        streaming = ProxyStreamingResponse(stream, content_type=stream.relay.content_type)
        streaming["X-Router-Endpoint"] = ep.name
        return streaming
    try:
        body = await response.read()
    except UPSTREAM_ERRORS as exc:
        response.close()
        lease.release()
        health.server_failed(ep, failures.midstream_reason(exc), strong=False)
        if attempt.counted:
            sinks.incomplete(principal, ep.url, lease.model)
        raise ApiError(
            502, f"upstream closed before its reply was complete ({ep.name})", headers=_named(ep.name)
        ) from None
    finally:
        response.release()
        lease.release()
    breakers.succeeded(ep.id)
    if status == 200:
        try:
            out, counts = attempt.read_body(body)
        except Exception as exc:
            log.warning("malformed reply from %s on %s: %s", ep.name, path, type(exc).__name__)
            if attempt.counted:
                sinks.incomplete(principal, ep.url, lease.model)
            raise ApiError(502, f"malformed reply from upstream {ep.name}", headers=_named(ep.name)) from None
        if attempt.counted:
            if counts is not None:
                sinks.record(principal, ep.url, lease.model, counts)
            else:
                sinks.incomplete(principal, ep.url, lease.model)
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
        self,
        lease: Lease,
        response: aiohttp.ClientResponse,
        relay: Relay,
        path: str,
        *,
        counted: bool,
        principal: Principal,
    ) -> None:
        self.lease = lease
        self.counted = counted
        self.principal = principal
        self.response = response
        self.relay = relay
        self.path = path
        self.closed = False
        self.finished = False  # the upstream ended normally
        self.gap_watch = client.GapWatch(response, settings.ROUTER_READ_TIMEOUT)

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
            reason = failures.midstream_reason(exc)
            health.server_failed(self.lease.endpoint, reason, strong=False)
            yield self.relay.error_chunk(f"upstream {self.lease.endpoint.name}: {reason}")
        except Exception:
            # A reply the relay could not translate (a shape no server should send): the
            # client gets the protocol's error ending, as for a cut stream. Unhandled, the
            # exception left the client's connection open with no end (it waited to its timeout).
            self.finished = False
            log.exception("malformed stream from %s on %s", self.lease.endpoint.name, self.path)
            yield self.relay.error_chunk(f"malformed reply from upstream {self.lease.endpoint.name}")
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
                breakers.succeeded(ep.id)
                self.response.release()  # the connection goes back to the pool
            else:
                self.response.close()  # cut off: drop the connection, cancelling the upstream
        finally:
            self.lease.release()
            # Usage the server already reported counts even when the upstream's end was not
            # read: a client that hangs up right after the last event (the OpenAI SDK closes
            # on [DONE]) must not turn a whole reply into an incomplete one.
            counts = self.relay.counts()
            if not self.counted:
                pass
            elif counts is not None:
                sinks.record(self.principal, ep.url, model, counts)
            else:
                sinks.incomplete(self.principal, ep.url, model)


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
