"""The router's front door: the base URL, HEAD, and CORS, around both paths of nomyo_site/asgi.py.

- `base_url`: `GET /` and `HEAD /` answer as Ollama's server does (200, `text/plain;
  charset=utf-8`, body `Ollama is running`; ollama/server/routes.go), which is what
  clients' "test connection" checks (Open WebUI, editor plugins, scripts). A browser
  navigating to `/` (its `Accept` names `text/html`) is sent to the page, `/dashboard/`,
  with a 302; `fetch()` from a script sends `Accept: */*` and gets Ollama's answer.
- `serve`: runs an ASGI app with two additions. HEAD: the app answers it as GET (the views
  accept HEAD wherever they accept GET, routing/protocols/common/decorators.py) and the body is dropped on
  the way out, so status and headers, `Content-Length` included, are the GET's; a stream
  stops after its headers. CORS (routing/server/cors.py): a request with an `Origin` header from
  an allowed origin gets the CORS headers on its reply, whatever the status; a preflight is
  answered here, before the API-key check (browsers send preflights without credentials);
  a disallowed origin gets 403 in the route's error shape and no CORS headers, as Ollama
  does. An API client's GET, POST or DELETE without `Origin`, the common case, never
  comes here: asgi.py tells it apart with one scan of the request headers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from routing.core.errors import error_body
from routing.server import cors as server_cors

log = logging.getLogger("routing.access")

Scope = dict[str, Any]
Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Any, Any], Awaitable[None]]

BASE_BODY = b"Ollama is running"
PAGE = b"/dashboard/"


class _HeadAnswered(Exception):
    """Raised through the app to stop a streamed reply whose headers a HEAD request got."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header `name` (lower-case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def _reply(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error_body(path: str, status: int, message: str) -> bytes:
    return json.dumps(error_body(path, status, message)).encode()


async def _error(send: Send, path: str, status: int, message: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = _error_body(path, status, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await _reply(send, status, headers, body)


async def base_url(scope: Scope, receive: Any, send: Send) -> None:
    """`/`: Ollama's answer for API clients, a redirect to the page for a browser's navigation."""
    if scope["method"] not in ("GET", "HEAD"):
        message = f"method {scope['method']} not allowed; use GET, HEAD"
        await _error(send, "/", 405, message, [(b"allow", b"GET, HEAD")])
        return
    if b"text/html" in (header(scope, b"accept") or b""):
        await _reply(send, 302, [(b"location", PAGE), (b"content-length", b"0")], b"")
        return
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(BASE_BODY)).encode()),
    ]
    await _reply(send, 200, headers, BASE_BODY)


def _without_body(send: Send, stop_streams: bool) -> Send:
    """`send` for a HEAD request: the start message as is, then one empty final body."""
    finished = False

    async def head_send(message: Message) -> None:
        nonlocal finished
        if message["type"] != "http.response.body":
            await send(message)
            return
        if not finished:
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if stop_streams and message.get("more_body", False):
            raise _HeadAnswered()

    return head_send


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return cors_send


async def serve(
    app: App, scope: Scope, receive: Any, send: Send, *, stop_streams: bool = True, cors: bool = True
) -> None:
    """Run `app` with HEAD and CORS handled (see the module docstring).

    `stop_streams`: under HEAD, end a streamed reply after its headers (the proxy routes'
    streams, e.g. /api/usage-stream, may never end by themselves). `cors`: apply the CORS
    policy (the API routes and `/`; not Django's pages, which are same-origin only).
    """
    origin = header(scope, b"origin") if cors else None
    method = scope["method"]
    if method == "HEAD":
        send = _without_body(send, stop_streams)  # the router's own replies below too
    if origin is not None:
        if not server_cors.allowed(origin, header(scope, b"host")):
            shown = origin.decode("latin-1")[:200]
            log.info("%s %s 403 origin %r not allowed (ROUTER_ORIGINS)", method, scope["path"], shown)
            message = f"origin {shown!r} is not allowed; add it to ROUTER_ORIGINS"
            await _error(send, scope["path"], 403, message, [(b"vary", b"Origin")])
            return
        if method == "OPTIONS":
            requested_method = header(scope, b"access-control-request-method")
            if requested_method is not None:
                requested = header(scope, b"access-control-request-headers")
                headers = server_cors.preflight_headers(origin, requested)
                if header(scope, b"access-control-request-private-network") == b"true":
                    # Chromium's Private Network Access: a public page calling a router on
                    # the local network asks this too; an allowed origin is trusted with it.
                    headers.append((b"access-control-allow-private-network", b"true"))
                await _reply(send, 204, headers, b"")
                return
        send = _with_headers(send, server_cors.reply_headers(origin))
    try:
        await app(scope, receive, send)
    except _HeadAnswered:
        pass
