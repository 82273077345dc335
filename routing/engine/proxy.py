"""The one forwarding path every routed request takes: select, reserve, send, relay, account.

Both protocols and every route come through `forward()`; only the `Planner` differs (which
url, which body, how to read the reply).

Slot ownership: from the moment `_acquire_any` returns a lease, `_forward_model` owns it in
one try/finally that releases it unless a `ProxyStream` took it over (the lean handler then
closes the stream whether or not it ever ran). Whatever raises in between (the planner,
the send, reading the reply, cancellation) the slot, and its cluster claim, come back.
`_acquire_any` itself hands out at most one lease: when an alias waits in several queues at
once, every other wait is cancelled and awaited, and a slot it was granted is given back.
A fallback to the next model of a chain starts only after the previous model's lease is
released (`Unplaced` is raised past that finally), so a request never holds two slots.

Aliases and fallback chains (routing/fleet/routes.py) are read from the registry's copy;
a plain model without a chain takes the same path as before, with no body rewritten.



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
import dataclasses
import functools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from routing.auth.principal import Principal
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
from routing.fleet.registry import registry
from routing.observability import metrics
from routing.upstream import client, failures
from routing.upstream.failures import UPSTREAM_ERRORS

log = logging.getLogger("routing.proxy")

MAX_ERROR_BODY = 64 * 1024
# Error statuses an attempt's `recover` hook is shown: 400/413/422 (a prompt too long, an image
# a model cannot see: llama.cpp, vLLM), 500 (Ollama's image error), 404/501 (no rerank there).
RECOVERABLE = frozenset({400, 404, 413, 422, 500, 501})
MAX_RECOVERIES = 3  # per attempt: each hook retries each kind of fix once; this bounds a bad hook


class Unplaced(ApiError):
    """No server for the model could take the request: none has it (404), all failing or
    unreachable, all busy past the wait or the queue full (503), or every one tried failed
    before replying (502). Nothing was answered, so the next model of a fallback chain may."""


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

    `model` may be an alias (routing/fleet/routes.py): its candidates are the servers of all its
    targets, each under its own name. When no server for it can take the request (`Unplaced`),
    the next model of its fallback chain is tried, one level deep, within ROUTER_QUEUE_TIMEOUT
    in all: each model but the last waits at most ROUTER_FALLBACK_WAIT for a slot. Every
    reply from a server names the model that answered (`X-Router-Model`, its server's spelling).

    The principal's name and priority place a queued request in the model's queue
    (routing/engine/fair_queue.py).

    Raises ApiError: 403 (the principal's key may not use the model), 404 (no endpoint has the
    model), 503 (none reachable or all busy), 400 (the planner could not build the upstream
    request), 504 (first-byte timeout), 502 (every tried server failed before replying)."""
    routes = await registry.routes()
    routes.require(principal, model)  # an alias by its targets
    lookup = await fleet_candidates.candidates_for(model)
    chain = routes.chain(model)
    if len(chain) == 1:
        return await _forward_model(
            request_path, model, lookup, plan, principal, metered, accept, affinity, asked=model
        )
    deadline = time.perf_counter() + settings.ROUTER_QUEUE_TIMEOUT
    tried: set[str] = set()  # model keys whose servers could not take it
    error: Unplaced | None = None
    for step, name in enumerate(chain):
        if step:
            if not routes.may_use(principal, name):
                continue
            lookup = await fleet_candidates.candidates_for(name)
            fresh = [c for c in lookup.candidates if c.key not in tried]
            if lookup.candidates and not fresh:
                continue  # e.g. an alias of a model that was just tried
            lookup = dataclasses.replace(lookup, candidates=fresh)
        keys = {c.key for c in lookup.candidates}
        remaining = max(0.0, deadline - time.perf_counter())
        wait = remaining if step == len(chain) - 1 else min(settings.ROUTER_FALLBACK_WAIT, remaining)
        try:
            return await _forward_model(
                request_path, name, lookup, plan, principal, metered, accept, affinity, asked=model, wait=wait
            )
        except Unplaced as exc:
            if error is None or (error.status == 404 and exc.status != 404):
                error = exc  # the first reason, unless it was "not found" and a later one says more
            tried |= keys
            if step < len(chain) - 1:
                metrics.fallbacks.inc()
                log.info("no server could take '%s' (%s): trying the next model", name, exc.message)
    assert error is not None  # the chain's first model is always tried
    raise error


async def _forward_model(
    request_path: str,
    model: str,
    lookup: fleet_candidates.Lookup,
    plan: Planner,
    principal: Principal,
    metered: bool,
    accept: Callable[[Candidate], ApiError | None] | None,
    affinity: str | None,
    *,
    asked: str,
    wait: float | None = None,
) -> HttpResponse | StreamingHttpResponse:
    """Serve the request with one model of the chain (`model`, a model or an alias name),
    waiting at most `wait` seconds (default ROUTER_QUEUE_TIMEOUT) for a slot. `asked`: what
    the client asked for, recorded beside the model that served. Raises `Unplaced` when no
    server of the model could take it, other ApiErrors as `forward` does."""
    lookup = fleet_candidates.usable_by(lookup, principal)
    if not lookup.candidates:
        if lookup.failing_with_model:
            raise Unplaced(503, f"every endpoint serving '{model}' is failing; try again", retry_after=5)
        if lookup.reachable == 0:
            raise Unplaced(503, "no endpoint is reachable", retry_after=5)
        raise Unplaced(404, f"model '{model}' not found", code="model_not_found")
    asked_key = model_key(asked)
    wait = settings.ROUTER_QUEUE_TIMEOUT if wait is None else wait
    candidates = _accepted(lookup.candidates, accept)
    failure = "no endpoint answered"
    tried = ""
    refused: ApiError | None = None  # set while every failure so far was a refusal
    for _ in range(settings.ROUTER_MAX_RETRIES + 1):
        if metered:
            lease = await _acquire_any(model, candidates, principal, wait, affinity)
        else:
            lease = board.unmetered(candidates[0].key, candidates)
        handed_over = False
        try:
            outcome = await _attempt(request_path, lease, plan, metered, principal, asked_key)
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
        raise refused  # the servers' own answer about this request: no fallback
    raise Unplaced(
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
    path: str, lease: Lease, plan: Planner, metered: bool, principal: Principal, asked: str
) -> HttpResponse | StreamingHttpResponse | str | ApiError:
    """One server's try: the reply, why it failed in a way that allows failover (str), or
    the error to give when no server can serve it (ApiError, from a `Refuse`). The caller
    owns the lease; this owns the upstream response until a reply takes it. The attempt's
    `reply_headers` go on whatever reply this server's answer becomes. asked: the model key the
    client asked for (an alias, or the origin of a fallback)."""
    attempt = _plan(plan, lease.candidate)
    requested = asked if asked != lease.model else ""  # recorded only when it differs
    outcome = await _try(path, lease, attempt, metered, principal, requested)
    if isinstance(outcome, (HttpResponse, StreamingHttpResponse)):
        for name, value in attempt.reply_headers.items():
            outcome[name] = value
    return outcome


async def _try(
    path: str, lease: Lease, attempt: Attempt, metered: bool, principal: Principal, requested: str
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
                    sinks.incomplete(principal, ep.url, lease.model, requested=requested)
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
                return _error_outcome(path, lease, status, body, complete, response.reason)
            lease.first_byte = time.perf_counter() - started  # the board averages it per endpoint and model
            metrics.first_byte(path, lease.first_byte)
            return await _reply(path, lease, attempt, response, principal, requested)
        except BaseException:
            response.close()  # never handed to a reply: drop the connection
            raise


def _error_outcome(
    path: str, lease: Lease, status: int, body: bytes, complete: bool, reason: str | None
) -> HttpResponse | str:
    """An error reply already read: a failover (str, for 502/503) or the client's reply."""
    ep = lease.endpoint
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
    return _error_reply(path, lease, status, body, reason)


def _refuses_added_field(body: bytes) -> bool:
    """A 400/422 about the `stream_options` the router added (servers that reject unknown
    parameters name it, e.g. "Unrecognized request argument supplied: stream_options")."""
    return b"stream_options" in body.lower()


async def _acquire_any(
    model: str, candidates: list[Candidate], principal: Principal, wait: float, affinity: str | None
) -> Lease:
    """A slot for `model` on one of `candidates`, waiting at most `wait` seconds.

    Slots and queues are per (server, real model) (routing/engine/board.py), so an alias's
    candidates are grouped by the real model each serves: one group (a plain model) is one
    `_acquire`; several (an alias whose targets have different names) are first tried without
    waiting, in an order that puts a group with the model loaded first (else at random), then
    waited for in every group's queue at once. The first slot wins; the other waits are
    cancelled and any slot they were handed in the same instant is given back, so only one
    lease ever leaves here, whatever happens meanwhile (cancellation included)."""
    key = candidates[0].key
    if all(cand.key == key for cand in candidates):  # a plain model: one real model
        return await _acquire(key, model, candidates, principal, wait, affinity)
    groups: dict[str, list[Candidate]] = {}
    for cand in candidates:
        groups.setdefault(cand.key, []).append(cand)
    order = sorted(groups.items(), key=lambda kv: (not any(c.loaded for c in kv[1]), random.random()))
    if not cluster.enabled():
        for key, group in order:
            lease = board.try_acquire(key, group, affinity=affinity, client=principal.name)
            if lease is not None:
                metrics.queue_wait(0.0)
                return lease
    request = object()  # one request in every queue it waits in (ROUTER_QUEUE_MAX counts it once)
    tasks = [
        asyncio.ensure_future(_acquire(key, model, group, principal, wait, affinity, request))
        for key, group in order
    ]
    winner: Lease | None = None
    try:
        pending: set[asyncio.Future[Lease]] = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if winner is None and not task.cancelled() and task.exception() is None:
                    winner = task.result()
        if winner is None:
            raise tasks[0].exception() or Unplaced(503, f"no slot for '{model}'")
        return winner
    finally:
        for task in tasks:
            task.cancel()
        # Let each wait leave its queue; a slot granted to a loser is handed back.
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Lease) and outcome is not winner:
                outcome.release()


async def _acquire(
    key: str,
    model: str,
    candidates: list[Candidate],
    principal: Principal,
    wait: float,
    affinity: str | None,
    request: object | None = None,
) -> Lease:
    waited = time.perf_counter()
    deadline = waited + wait
    try:
        if affinity is not None and shared_affinity.enabled:
            await shared_affinity.prefetch(key, affinity)  # one Redis read, only on a local miss
        lease = await board.acquire(
            key,
            candidates,
            timeout=wait,
            queue_max=settings.ROUTER_QUEUE_MAX,
            client=principal.name,
            priority=principal.priority,
            affinity=affinity,
            request=request,
        )
        if cluster.enabled():
            lease = await _claim_in_cluster(lease, key, candidates, deadline, principal, affinity, request)
        if affinity is not None and shared_affinity.enabled:
            shared_affinity.flush()  # what the pick remembered, to Redis in the background
        metrics.queue_wait(time.perf_counter() - waited)
        return lease
    except QueueFull:
        raise Unplaced(503, "the router's queue is full; try again shortly", retry_after=1) from None
    except QueueTimeout:
        raise Unplaced(
            503, f"every endpoint serving '{model}' stayed busy; try again", retry_after=5
        ) from None


async def _claim_in_cluster(
    lease: Lease,
    key: str,
    candidates: list[Candidate],
    deadline: float,
    principal: Principal,
    affinity: str | None = None,
    request: object | None = None,
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
                request=request,
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


def _error_reply(path: str, lease: Lease, status: int, body: bytes, reason: str | None) -> HttpResponse:
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
    _name_server(reply, lease)
    return reply


def _name_server(reply: HttpResponse | StreamingHttpResponse, lease: Lease) -> None:
    """Which server answered, and with which model (its own spelling of it: the real model
    behind an alias, or the fallback that answered)."""
    reply["X-Router-Endpoint"] = lease.endpoint.name
    reply["X-Router-Model"] = lease.candidate.backend_model


async def _reply(
    path: str,
    lease: Lease,
    attempt: Attempt,
    response: aiohttp.ClientResponse,
    principal: Principal,
    requested: str,
) -> HttpResponse | StreamingHttpResponse:
    ep = lease.endpoint
    status = response.status
    if status == 404:
        caches.advertised.invalidate(ep.id)  # it no longer has the model we thought it had
    if status >= 400:
        error = await _read_error(response)
        breakers.succeeded(ep.id)  # it answered normally, about this request
        return _error_reply(path, lease, status, error, response.reason)
    if attempt.stream and status == 200:
        try:
            relay = attempt.relay()
        except Exception as exc:
            raise ApiError(
                502, f"cannot relay the reply of {ep.name}: {exc}"[:500], headers=_named(ep.name)
            ) from None
        stream = ProxyStream(
            lease, response, relay, path, counted=attempt.counted, principal=principal, requested=requested
        )
        streaming = ProxyStreamingResponse(stream, content_type=stream.relay.content_type)
        _name_server(streaming, lease)
        return streaming
    try:
        body = await response.read()
    except UPSTREAM_ERRORS as exc:
        response.close()
        lease.release()
        health.server_failed(ep, failures.midstream_reason(exc), strong=False)
        if attempt.counted:
            sinks.incomplete(principal, ep.url, lease.model, requested=requested)
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
                sinks.incomplete(principal, ep.url, lease.model, requested=requested)
            raise ApiError(502, f"malformed reply from upstream {ep.name}", headers=_named(ep.name)) from None
        if attempt.counted:
            if counts is not None:
                sinks.record(principal, ep.url, lease.model, counts, requested=requested)
            else:
                estimate = attempt.estimate
                sinks.incomplete(principal, ep.url, lease.model, requested=requested, estimate=estimate)
    else:
        out = body
    reply = HttpResponse(
        out, status=status, content_type=response.headers.get("Content-Type", "application/json")
    )
    _name_server(reply, lease)
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
        requested: str = "",
    ) -> None:
        self.lease = lease
        self.requested = requested  # the model key the client asked for, when not the one served
        self.counted = counted
        self.principal = principal
        self.response = response
        self.relay = relay
        self.path = path
        self.closed = False
        self.finished = False  # the upstream ended normally
        self.gap_watch = client.GapWatch(response, settings.ROUTER_READ_TIMEOUT)
        # A client key's stream counts the records it relays (NDJSON lines, SSE events by their
        # data lines): charged when the stream ends without counts (accounting.py `incomplete`).
        self.relayed = 0
        self.record_mark = (
            (b"\n" if relay.content_type == "application/x-ndjson" else b"data:")
            if counted and principal.kind == "key"
            else None
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        read = self.response.content.readany
        feed = self.relay.feed
        mark = self.record_mark
        try:
            while chunk := await read():
                out = feed(chunk)
                if out:
                    if mark is not None:
                        self.relayed += out.count(mark)
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
                sinks.record(self.principal, ep.url, model, counts, requested=self.requested)
            else:
                sinks.incomplete(
                    self.principal, ep.url, model, requested=self.requested, estimate=self.relayed
                )


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
