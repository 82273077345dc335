"""The lean ASGI path for the proxy routes, chosen by path in nomyo_site/asgi.py.

Django's full handler runs every request inside a thread-sensitive context, fires
`request_started`/`request_finished` (whose receivers hop to a thread to close database
connections) and closes responses in a thread. The proxy routes do no database work, so
they skip all of that: the body is read once (bounded by ROUTER_MAX_BODY), a light
request is built (`ProxyRequest`), the view is found by exact path in a table built from
`routing.protocols.urls` (or, for a route ending in `<path:name>`, by its fixed prefix: the rest
of the path is the view's argument), the async view runs, and the reply is sent. Auth and request ids
are async checks here rather than sync-capable middleware. Admin and pages stay on
Django's normal, fully safe path.

A body declared (Content-Length) larger than ROUTER_MAX_BODY is refused before any of it is
read, a chunked one as soon as its count passes the limit. Every request being served is
in `lifecycle.in_flight` from its first await to its end, so a shutdown drain can wait for
it or cut it; while the router drains, new requests (but /health and /metrics) get 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import BadRequest, SuspiciousOperation
from django.http import HttpRequest, HttpResponse, HttpResponseBase, QueryDict, StreamingHttpResponse
from django.urls import URLPattern, get_resolver
from django.utils.functional import cached_property

from routing.auth import keys
from routing.auth.keys import router_key
from routing.auth.principal import ANONYMOUS, Principal
from routing.auth.quotas import NOTHING_TAKEN, Admission, QuotaExceeded, anthropic_ratelimit_headers
from routing.core.errors import ApiError, error_response, is_anthropic_path, is_openai_path
from routing.engine.proxy import ProxyStreamingResponse
from routing.observability import metrics
from routing.server.lifecycle import lifecycle
from routing.status.serving import serving

log = logging.getLogger("routing.access")
STREAM_FAILED = b'{"error":"internal router error during the stream; see the router\'s log"}\n'

PROXY_PREFIXES = ("/api/", "/v1/")
PROXY_PATHS = frozenset({"/health", "/metrics", "/api", "/v1", "/rerank"})
OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without credentials
# Authenticated but outside a key's limits: a key over its limit can still read its usage.
UNMETERED_PATHS = frozenset({"/api/me"})
# Still served while the router drains (/health then says "draining"); the rest gets 503.
DRAIN_OPEN_PATHS = frozenset({"/health", "/metrics"})
DRAIN_RETRY_AFTER = 5  # seconds, in the Retry-After of a 503 sent while draining
CUT_SEND_TIMEOUT = 1.0  # seconds a cut request may take to send its error and end

Scope = dict[str, Any]


def is_proxy_path(path: str) -> bool:
    """A path the lean handler answers: a route of its table, or any other path under /api/ or
    /v1/, with any number of leading slashes (`//api/chat`: a client's base URL ending in '/'),
    so every such path gets the protocol's JSON error (404 "no route"), never Django's HTML page.
    Such paths are not normalised: a request is served at its route's own path only."""
    if path.startswith(PROXY_PREFIXES) or path in PROXY_PATHS:
        return True
    return path.startswith("//") and ("/" + path.lstrip("/")).startswith(PROXY_PREFIXES)


class Disconnected(Exception):
    pass


View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


class ProxyRequest(HttpRequest):
    """What a proxy view reads of its request: method, path, body and query string.

    Django's ASGIRequest copies every header into META and builds its query dicts up
    front (about 4 us a request here, against 0.2); the proxy views need none of that, so
    this request fills in only what they read and parses the query string only when asked.
    """

    def __init__(self, scope: Scope, body: bytes, principal: Principal) -> None:
        self.scope = scope
        self.principal = principal  # who the request acts for (routing/auth/principal.py)
        self.method = scope["method"]
        self.path = self.path_info = scope["path"]
        self._body = body
        self.META = {}
        self.resolver_match = None

    @cached_property
    def GET(self) -> QueryDict:  # type: ignore[override]
        return QueryDict(self.scope.get("query_string", b"").decode("latin-1"))


def proxy_views(urlconf: str) -> dict[str, View]:
    """Exact path -> view, from the route table `urlconf` (a dotted module path with `urlpatterns`).
    Every proxy route is a fixed path or a fixed prefix ending in one `<path:name>` (those are in
    `prefix_routes`); any other pattern is a ValueError."""
    views: dict[str, View] = {}
    for pattern in get_resolver(urlconf).url_patterns:
        route = str(pattern.pattern)
        if not isinstance(pattern, URLPattern):
            raise ValueError(f"proxy routes are fixed paths or prefixes; {route!r} is not")
        if "<" not in route:
            views["/" + route] = pattern.callback
        elif _prefix_of(route) is None:
            raise ValueError(f"proxy routes are fixed paths or prefixes; {route!r} is not")
    return views


@dataclass(frozen=True, slots=True)
class PrefixRoute:
    """A route `prefix` + one path argument (ids with '/' and ':', e.g. /v1/models/{model_id})."""

    prefix: str  # "/v1/models/"
    argument: str  # the view's keyword argument: "model_id"
    label: str  # its metrics label, one per route whatever the argument: "/v1/models/{model_id}"
    view: View


def _prefix_of(route: str) -> tuple[str, str] | None:
    """("v1/models/", "model_id") for "v1/models/<path:model_id>"; None for any other shape."""
    head, sep, tail = route.partition("<path:")
    if not sep or "<" in head or not head.endswith("/") or not tail.endswith(">"):
        return None
    name = tail[:-1]
    return (head, name) if name.isidentifier() else None


def prefix_routes(urlconf: str) -> tuple[PrefixRoute, ...]:
    """The prefix routes of the route table `urlconf`, longest prefix first."""
    found = []
    for pattern in get_resolver(urlconf).url_patterns:
        if not isinstance(pattern, URLPattern):
            continue
        shape = _prefix_of(str(pattern.pattern))
        if shape is not None:
            head, name = shape
            found.append(PrefixRoute("/" + head, name, f"/{head}{{{name}}}", pattern.callback))
    return tuple(sorted(found, key=lambda r: -len(r.prefix)))


class ProxyHandler:
    def __init__(self, urlconf: str) -> None:
        """urlconf: the dotted path of the route table (nomyo_site.proxy_urls)."""
        global _routes, _prefixes
        self.views = proxy_views(urlconf)  # imports the views now, not on the first request
        self.prefixes = prefix_routes(urlconf)
        _routes = _routes | self.views.keys()
        _prefixes = _prefixes + self.prefixes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        lifecycle.ensure_started()
        path: str = scope["path"]
        request_id, declared_length = _request_headers(scope)
        started = time.perf_counter()
        if serving.draining and path not in DRAIN_OPEN_PATHS:
            refused = error_response(path, _draining_error())
            try:
                await self._send(send, refused, request_id)
            finally:  # counted and logged like every other request
                self._account(scope, path, refused, refused.status_code, started, request_id)
            return
        task = asyncio.current_task()
        assert task is not None
        in_flight = lifecycle.in_flight
        in_flight.add(task)  # before any await: the drain waits for (or cuts) this request
        response: HttpResponseBase | None = None
        listener: asyncio.Future[Any] | None = None
        disconnected = False
        status = 0
        caller = _Caller()

        def on_message(fut: asyncio.Future[Any]) -> None:
            nonlocal disconnected
            if fut.cancelled() or fut.exception() is not None:
                return
            if fut.result().get("type") == "http.disconnect":
                disconnected = True
                task.cancel()

        try:
            try:
                body = await self._read_body(receive, declared_length)
            except Disconnected:
                return
            except ApiError as err:  # a body over ROUTER_MAX_BODY or too slow: counted like any reply
                status = err.status
                await self._send(send, error_response(path, err), request_id)
                return
            listener = asyncio.ensure_future(receive())
            listener.add_done_callback(on_message)
            response = await self._respond(scope, path, body, caller)
            status = response.status_code
            await self._send(send, response, request_id)
        except asyncio.CancelledError:
            if disconnected:
                status = 499  # the client went away
            elif task in lifecycle.cut:
                task.uncancel()
                if listener is not None:
                    listener.remove_done_callback(on_message)
                status = 503
                await self._cut_short(send, path, response, request_id)
            else:
                raise
        finally:
            in_flight.discard(task)
            try:
                if listener is not None:
                    listener.remove_done_callback(on_message)
                    listener.cancel()
                    if isinstance(response, ProxyStreamingResponse):
                        await response.finish()
                if listener is not None or status:  # not: a client gone before its body was read
                    self._account(scope, path, response, status, started, request_id, caller)
            finally:
                caller.admission.release()  # the key's concurrency place, on every path

    def _account(
        self,
        scope: Scope,
        path: str,
        response: HttpResponseBase | None,
        status: int,
        started: float,
        request_id: str,
        caller: _Caller | None = None,
    ) -> None:
        """The request's metrics and its one access-log line."""
        endpoint = response.get("X-Router-Endpoint", "") if response is not None else ""
        elapsed = time.perf_counter() - started
        metrics.request_done(_route_label(path), endpoint, status, elapsed)
        principal = caller.principal if caller is not None else None
        if principal is not None:
            metrics.client_request_done(principal.name, status)
        log.info(
            "%s %s %s %.1fms endpoint=%s client=%s request_id=%s",
            scope.get("method"),
            path,
            status,
            elapsed * 1000,
            endpoint or "-",
            principal.name if principal is not None else "-",
            request_id,
        )

    async def _cut_short(
        self, send: Any, path: str, response: HttpResponseBase | None, request_id: str
    ) -> None:
        """End a request the drain cut: a 503 if nothing was sent yet, else the stream's own
        error chunk and its end (as when an upstream fails mid-reply). Bounded: a client that
        does not read gets its connection closed by the server instead."""
        try:
            async with asyncio.timeout(CUT_SEND_TIMEOUT):
                if response is None:
                    await self._send(send, error_response(path, _draining_error()), request_id)
                elif isinstance(response, ProxyStreamingResponse):
                    chunk = response.proxy_stream.relay.error_chunk(
                        "the router is shutting down; this reply was cut before its end"
                    )
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, OSError):
            pass

    async def _read_body(self, receive: Any, declared_length: int = -1) -> bytes:
        """The whole request body, refused with 413 as soon as it is known to pass ROUTER_MAX_BODY:
        by its Content-Length before anything is read, else (chunked) as the count passes it;
        408 when it is not whole ROUTER_BODY_TIMEOUT seconds after the handler started (uvicorn
        calls it once the headers are in).
        (Under daphne, routing/server/daphne_hooks.py refuses earlier still, inside Twisted.)"""
        limit = settings.ROUTER_MAX_BODY
        if declared_length > limit:
            raise _too_large(limit)
        message = await receive()  # the common case: the whole body in one message, no timer
        if message["type"] == "http.request" and not message.get("more_body", False):
            body: bytes = message.get("body", b"")
            if len(body) > limit:
                raise _too_large(limit)
            return body
        timeout = settings.ROUTER_BODY_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                return await self._read_rest(receive, message, limit)
        except TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {timeout:g} s", headers={"Connection": "close"}
            ) from None

    async def _read_rest(self, receive: Any, message: dict[str, Any], limit: int) -> bytes:
        """The body from its first message on (ROUTER_BODY_TIMEOUT bounds the whole read)."""
        parts: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                raise Disconnected()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)
            message = await receive()

    async def _respond(self, scope: Scope, path: str, body: bytes, caller: _Caller) -> HttpResponseBase:
        try:
            principal = await _principal(scope, path, caller)
            view = self.views.get(path)
            response: HttpResponseBase | None = None
            if view is not None:
                # The body was read (and bounded) above; Django's own size cap is for forms.
                response = await view(ProxyRequest(scope, body, principal))
            else:
                for route in self.prefixes:
                    if path.startswith(route.prefix) and len(path) > len(route.prefix):
                        argument = {route.argument: path[len(route.prefix) :]}
                        response = await route.view(ProxyRequest(scope, body, principal), **argument)
                        break
            if response is None:
                raise ApiError(404, f"no route {path}")
            if is_openai_path(path) and caller.admission.headers:  # built only for OpenAI replies
                for name, value in _ratelimit_headers(path, caller.admission.headers).items():
                    response[name] = value
            return response
        except QuotaExceeded as err:
            refused = error_response(path, err)
            if is_openai_path(path):  # the rate limit headers of OpenAI's protocol (Anthropic's)
                for name, value in _ratelimit_headers(path, err.ratelimit).items():
                    refused[name] = value
            return refused
        except ApiError as err:
            return error_response(path, err)
        except (BadRequest, SuspiciousOperation) as exc:
            # Django's request parsing refusing the client's input (TooManyFieldsSent from
            # a query string over DATA_UPLOAD_MAX_NUMBER_FIELDS): the client's error.
            return error_response(path, ApiError(400, str(exc) or "bad request"))
        except Exception:
            log.exception("unexpected error on %s", path)
            return error_response(path, ApiError(500, "internal router error; see the router's log"))

    async def _send(self, send: Any, response: HttpResponseBase, request_id: str) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
        headers.append((b"x-request-id", request_id.encode("latin-1")))
        if isinstance(response, HttpResponse) and not response.has_header("Content-Length"):
            # A whole reply goes out with its length: no chunked framing, one write.
            headers.append((b"content-length", str(len(response.content)).encode("latin-1")))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        if isinstance(response, ProxyStreamingResponse):
            # The relay already yields bytes: skip Django's two wrapping generators per chunk.
            async for chunk in response.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif isinstance(response, StreamingHttpResponse):
            chunks = aiter(response)  # type: ignore[call-overload]
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except Exception:
                    # The view's stream failed after the headers, where no status can say it: it
                    # ends with an error line (the shape of Ollama's streamed errors, the only
                    # such streams here) and is closed. What `send` raises is not caught here.
                    log.exception("a stream failed after its headers (request %s)", request_id)
                    await send({"type": "http.response.body", "body": STREAM_FAILED, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            assert isinstance(response, HttpResponse)
            await send({"type": "http.response.body", "body": response.content, "more_body": False})


def _request_headers(scope: Scope) -> tuple[str, int]:
    """(request id, declared Content-Length or -1) in one pass over the headers. The id is the
    client's X-Request-Id cut to 64 characters, else a random one."""
    request_id = ""
    length = -1
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            request_id = value[:64].decode("latin-1")
        elif key == b"content-length" and value.isdigit():
            length = int(value)
    return request_id or os.urandom(8).hex(), length


def _too_large(limit: int) -> ApiError:
    # Connection: close, so the server does not go on reading (and discarding) the rest.
    return ApiError(413, f"request body is larger than {limit} bytes", headers={"Connection": "close"})


def _draining_error() -> ApiError:
    message = "the router is shutting down; retry (another instance)"
    return ApiError(503, message, retry_after=DRAIN_RETRY_AFTER)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class _Caller:
    """Who one request acts for, once known, and what its admission took (released by the handler
    when the request ends)."""

    __slots__ = ("admission", "principal")

    def __init__(self) -> None:
        self.principal: Principal | None = None
        self.admission: Admission = NOTHING_TAKEN


async def _principal(scope: Scope, path: str, caller: _Caller) -> Principal:
    """Who the request acts for, admitted under its limits (routing/auth/keys.py). Raises ApiError
    401/403/429 on every path but the open ones (/health), where a caller without the router key
    is ANONYMOUS. A known key refused (403 disabled or expired, 429 over a limit) is still the
    request's caller: its access line and metrics name it."""
    authorization = _header(scope, b"authorization")
    if path in OPEN_PATHS:
        return router_key.identify(authorization) or ANONYMOUS
    api_key = _header(scope, b"x-api-key")
    try:
        if path in UNMETERED_PATHS:
            caller.principal = await keys.authenticate(authorization, api_key)
        else:
            caller.principal, caller.admission = await keys.admit_request(authorization, api_key)
    except (keys.KeyRefused, QuotaExceeded) as refused:
        caller.principal = refused.principal
        raise
    return caller.principal


# Route label values: the paths of every route table a handler was built from (nomyo_site/asgi.py
# builds one), so a new route gets its own label with no list to keep. Any other path is
# "other": unknown paths create no new time series. Grown only at start-up, replaced whole.
_routes: frozenset[str] = frozenset()
_prefixes: tuple[PrefixRoute, ...] = ()


def _route_label(path: str) -> str:
    """The `route` label of a request for `path`: the path when it is in the route table, a prefix
    route's label ("/v1/models/{model_id}") for a path under it, else "other"."""
    if path in _routes:
        return path
    for route in _prefixes:
        if path.startswith(route.prefix) and len(path) > len(route.prefix):
            return route.label
    return "other"


def _ratelimit_headers(path: str, openai: dict[str, str]) -> dict[str, str]:
    """The rate limit headers for a reply on `path` (under /v1): OpenAI's x-ratelimit-*, or their
    Anthropic names on the Messages API's routes."""
    return anthropic_ratelimit_headers(openai, time.time()) if is_anthropic_path(path) else openai
