"""Hooks into daphne, installed when it is the server: TCP_NODELAY, no form parsing, a
longer listen backlog, one access-log line per proxied request.

Daphne writes a response as several small writes (headers, then each body chunk).
With Nagle's algorithm on, a small write waits for the ACK of the previous one, and a
client with delayed ACKs holds that ACK for up to 40 ms: a ~40 ms p99 at concurrency 1.
Twisted's HTTP channel turns Nagle off itself since Twisted 24.7; the hook does it too, for
an older Twisted. uvicorn sets TCP_NODELAY itself.

The same hook makes daphne's requests skip Twisted's form parsing: for every POST
Twisted parses the Content-Type header with the `email` package (about 5% of the
router's CPU under load) to find form uploads for `request.args`, which daphne never
reads; it hands the raw body to the application.

And daphne's TCP sockets listen with a backlog of 2048 (uvicorn's default)
instead of Twisted's 50: while the event loop is busy relaying streams, a burst of new
connections otherwise overflows the queue, and each dropped SYN costs its client a
1 to 3 s retransmit (1,000 streams opened within a second lost a third of their SYNs).

And daphne's own access log (stdout, on by default) skips the proxy routes: the router
logs each of them itself (`routing.access`, with the endpoint chosen and the request id),
and a second line per request cost one more write(2) and its formatting.
Admin and page requests keep daphne's line.

Memory bounded by settings, not by clients (the three hooks below), and time: a body still
incomplete ROUTER_BODY_TIMEOUT seconds after its headers is answered 408 inside Twisted
(daphne hands the application nothing before the whole body is in) and its connection closed.

- Request bodies. Twisted receives a whole body (into memory, or a temporary file past
  100 kB) before daphne calls the application, and daphne then queues all of it for the
  application at once: a 400 MB body cost 400 MB of RSS before the router could refuse it.
  Here the request refuses a body over ROUTER_MAX_BODY inside Twisted: by its
  Content-Length as soon as the headers are in (before any byte of it is read, and before
  Twisted would answer `Expect: 100-continue`), and a chunked one as soon as its count
  passes the limit. The 413 goes out in the route's error shape with `Connection: close`;
  the rest of the body is then read and dropped (so a client that sends it all before
  reading still gets the 413) for at most LINGER_SECONDS and LINGER_BYTES (or
  ROUTER_MAX_BODY if larger), and the connection is closed.
- Backpressure on replies. Daphne's `send` never waits: each chunk goes into Twisted's
  transport buffer, so a client reading slowly made the router read the upstream as fast
  as the backend wrote and hold the difference. Twisted tells the channel when its buffer
  passes 64 kB (`pauseProducing`) and when it has drained (`resumeProducing`); here that
  state becomes a future on the channel, and daphne's `send` awaits it after writing. The
  lean handler then stops reading the upstream, aiohttp stops reading its socket once its
  own buffer is full, and TCP slows the backend. The check costs one attribute read per
  message; the wait happens only while the client is behind.
- Drain. daphne cancels every application when the reactor stops; here that waits for
  the router's drain first (routing/server/lifecycle.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import time
from typing import Any

from django.conf import settings

from routing.core.errors import ApiError, error_response
from routing.observability.metrics import requests
from routing.server import cors
from routing.server.lean_asgi import _route_label, is_proxy_path
from routing.server.lifecycle import lifecycle

LISTEN_BACKLOG = 2048
# After a refused body, its rest is read and dropped for at most this long and this much
# (or ROUTER_MAX_BODY if larger), then the connection is closed.
LINGER_SECONDS = 5.0
LINGER_BYTES = 8 << 20

log = logging.getLogger("routing.access")


def install() -> None:
    # The daphne and Twisted imports below are inside functions: they run only under daphne
    # (importing Twisted's reactor elsewhere would install one).
    if "daphne.server" not in sys.modules:
        return
    from daphne.http_protocol import HTTPFactory, WebRequest  # daphne only
    from twisted.web.http import HTTPChannel  # daphne only

    if getattr(HTTPFactory, "_router_hooks", False):
        return
    original = HTTPFactory.buildProtocol
    request_factory = _without_form_parsing(WebRequest)

    def build_protocol(self: Any, addr: Any) -> Any:
        protocol = original(self, addr)
        if protocol is not None and request_factory is not None:
            protocol.requestFactory = request_factory
        return protocol

    # The channel, not the protocol daphne's factory returns: that one is a proxy whose
    # makeConnection goes straight to the channel, so a hook set on it never runs.
    channel_made = HTTPChannel.connectionMade

    def connection_made(self: Any) -> None:
        channel_made(self)
        try:
            self.transport.setTcpNoDelay(True)  # Twisted >= 24.7 does this itself
        except Exception:  # not a TCP transport (unix socket)
            pass
        _write_without_polling(self.transport)

    HTTPFactory.buildProtocol = build_protocol  # type: ignore[method-assign]
    HTTPChannel.connectionMade = connection_made  # type: ignore[method-assign]
    HTTPFactory._router_hooks = True  # type: ignore[attr-defined]
    _raise_listen_backlog()
    _skip_proxy_access_lines()
    _send_waits_while_paused()
    _kill_applications_after_drain()


def _write_without_polling(transport: Any) -> None:
    """Send a transport's buffered writes at the next turn of the loop, without asking epoll.

    Twisted buffers every write and registers the socket for writability; the next poll
    reports it writable (an idle socket always is), Twisted sends and unregisters it: two
    epoll_ctl calls and a poll event per burst of writes, which for a stream is every
    chunk. Here the send is scheduled with call_soon instead, still after everything
    written in the same turn (so the head and body of a reply go out in one send). Only a
    send the kernel cannot take whole falls back to Twisted's own registration, which then
    waits for room as before; buffering, close and errors stay Twisted's (doWrite).
    """
    reactor = getattr(transport, "reactor", None)
    loop = getattr(reactor, "_asyncioEventloop", None)
    writers = getattr(reactor, "_writers", None)
    read_or_write = getattr(reactor, "_readOrWrite", None)
    if loop is None or writers is None or read_or_write is None or not hasattr(transport, "dataBuffer"):
        return  # another reactor or Twisted version: keep its behaviour
    start_polling = transport.startWriting
    scheduled = False

    def flush() -> None:
        nonlocal scheduled
        scheduled = False
        if transport.fileno() == -1 or not transport.connected or transport in writers:
            return  # closed meanwhile, or already waiting for room through epoll
        read_or_write(transport, False)  # what the reactor does when epoll says writable
        unsent = transport._tempDataBuffer or transport.offset < len(transport.dataBuffer)
        if transport.connected and unsent:
            start_polling()  # the kernel's buffer is full: wait for room as Twisted would

    def start_writing() -> None:
        nonlocal scheduled
        if scheduled or transport in writers:
            return
        scheduled = True
        loop.call_soon(flush)

    transport.startWriting = start_writing


def _skip_proxy_access_lines() -> None:
    from daphne.server import Server  # daphne only

    original = Server.log_action

    def log_action(self: Any, protocol: str, action: str, details: dict[str, Any]) -> None:
        if protocol == "http" and is_proxy_path(str(details.get("path", "")).partition("?")[0]):
            return
        original(self, protocol, action, details)

    Server.log_action = log_action  # type: ignore[method-assign]


def _raise_listen_backlog() -> None:
    """daphne builds its listening sockets from endpoint strings: add a backlog to tcp ones."""
    import daphne.server  # daphne only

    original = daphne.server.serverFromString

    def server_from_string(reactor: Any, description: str) -> Any:
        if description.startswith(("tcp:", "tcp6:")) and ":backlog=" not in description:
            description += f":backlog={LISTEN_BACKLOG}"
        return original(reactor, description)

    daphne.server.serverFromString = server_from_string  # type: ignore[attr-defined]


def _without_form_parsing(web_request: type) -> type | None:
    """daphne's request class with Twisted's POST form parsing off and the body limit on
    (None: Twisted too old; the lean handler's own limit then still applies)."""
    from twisted.web.http import Request  # only under daphne (Twisted's reactor is daphne's)

    if "parsePOSTFormSubmission" not in inspect.signature(Request.__init__).parameters:
        return None
    limit = settings.ROUTER_MAX_BODY
    most_dropped = max(limit, LINGER_BYTES)

    class RawBodyRequest(web_request):  # type: ignore[misc,valid-type]
        _router_received = 0
        _router_refused = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parsePOSTFormSubmission", False)
            super().__init__(*args, **kwargs)

        def gotLength(self, length: int | None) -> None:
            # Called once the headers are in, before any body byte and before Twisted
            # would answer `Expect: 100-continue`.
            if length is not None and length > limit:
                self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the 413
                super().gotLength(0)
                _refuse_body(self, limit)
                return
            super().gotLength(length)
            if length or (length is None and self.requestHeaders.hasHeader(b"transfer-encoding")):
                _body_deadlines.watch(self)  # a body to read: bound its time

        def handleContentChunk(self, data: bytes) -> None:
            self._router_received += len(data)
            if self._router_refused:  # the rest of a refused body: dropped, up to a point
                if self._router_received > most_dropped:
                    self.channel.transport.abortConnection()
                return
            if self._router_received > limit:
                _refuse_body(self, limit)
                return
            super().handleContentChunk(data)

        def connectionLost(self, reason: Any) -> None:
            _body_deadlines.unwatch(self)
            super().connectionLost(reason)

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            _body_deadlines.unwatch(self)  # the whole body arrived in time
            if self._router_refused:
                self.channel.transport.loseConnection()  # all of it dropped: close cleanly
                return
            super().requestReceived(command, path, version)

    return RawBodyRequest


def _refuse_body(request: Any, limit: int) -> None:
    """Answer 413 in the route's error shape straight on the transport, then linger."""
    from twisted.internet import reactor  # daphne only

    transport = _answer_early(
        request, 413, b"Request Entity Too Large", f"request body is larger than {limit} bytes"
    )

    def close() -> None:
        if transport.connected:
            transport.abortConnection()

    reactor.callLater(LINGER_SECONDS, close)  # type: ignore[attr-defined,arg-type]


class _BodyDeadlines:
    """The requests whose body is being read, each with its deadline (ROUTER_BODY_TIMEOUT after
    its headers); one Twisted timer sweeps them every SWEEP s, so a request costs a dict insert
    and a pop instead of a timer armed and cancelled (which reschedules the asyncio reactor's
    timer each time). A late body is answered 408 within SWEEP s of its deadline. Reactor
    thread only: no lock."""

    SWEEP = 1.0

    def __init__(self) -> None:
        self._due: dict[Any, float] = {}
        self._sweeper: Any = None  # the LoopingCall, while some request is watched

    def watch(self, request: Any) -> None:
        from twisted.internet import task  # daphne only

        self._due[request] = time.monotonic() + settings.ROUTER_BODY_TIMEOUT
        if self._sweeper is None:
            self._sweeper = task.LoopingCall(self._sweep)
            self._sweeper.start(min(self.SWEEP, settings.ROUTER_BODY_TIMEOUT), now=False)

    def unwatch(self, request: Any) -> None:
        self._due.pop(request, None)

    def _sweep(self) -> None:
        if not self._due:
            self._sweeper.stop()
            self._sweeper = None
            return
        now = time.monotonic()
        late = [request for request, due in self._due.items() if due <= now]
        for request in late:
            del self._due[request]
            try:
                _expire_body(request)
            except Exception:  # one failed answer must not stop the sweep for the others
                log.exception("answering a late request body with 408 failed")


_body_deadlines = _BodyDeadlines()


def _expire_body(request: Any) -> None:
    """Answer 408 and close the connection: the body was not whole in time."""
    transport = request.channel.transport if request.channel is not None else None
    if request._router_refused or transport is None or not transport.connected:
        return
    _answer_early(
        request,
        408,
        b"Request Timeout",
        f"the request body did not arrive within {settings.ROUTER_BODY_TIMEOUT:g} s",
    )
    transport.loseConnection()  # after the 408 is written; the rest of the body is not read


def _answer_early(request: Any, status: int, reason: bytes, message: str) -> Any:
    """Answer `status` in the route's error shape straight on the transport, before the
    application has the request (its body is refused); counted and logged as the lean handler
    would. Returns the transport."""
    request._router_refused = True
    channel = request.channel
    transport = channel.transport
    channel.persistent = False
    raw_path = getattr(channel, "_path", b"/")  # the request target; Twisted keeps it until the body ends
    path = raw_path.partition(b"?")[0].decode("latin-1")
    given = request.requestHeaders.getRawHeaders(b"x-request-id")
    request_id = given[-1][:64].decode("latin-1") if given else os.urandom(8).hex()
    response = error_response(path, ApiError(status, message))
    head = [b"HTTP/1.1 %d %s" % (status, reason)]
    head += [f"{k}: {v}".encode("latin-1") for k, v in response.items()]
    head.append(b"X-Request-Id: " + request_id.encode("latin-1"))
    head += [k + b": " + v for k, v in _cors_headers(request)]  # a browser app reads it too
    head += [b"Content-Length: %d" % len(response.content), b"Connection: close"]
    transport.write(b"\r\n".join(head) + b"\r\n\r\n" + response.content)
    requests.labels(route=_route_label(path), endpoint="", status=str(status)).inc()
    method = getattr(channel, "_command", b"-").decode("latin-1")
    log.info("%s %s %d %s request_id=%s", method, path, status, message, request_id)
    return transport


def _cors_headers(request: Any) -> list[tuple[bytes, bytes]]:
    """The CORS headers routing.server.front would add to this reply (none without an allowed Origin)."""
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if not origins:
        return []
    hosts = request.requestHeaders.getRawHeaders(b"host")
    origin = origins[-1]
    if cors.allowed(origin, hosts[-1] if hosts else None):
        return cors.reply_headers(origin)
    return []


def _send_waits_while_paused() -> None:
    """daphne's `send` awaits, after writing, while Twisted's transport buffer is over its mark."""
    from daphne.server import Server  # daphne only
    from twisted.web.http import HTTPChannel  # daphne only

    HTTPChannel._router_writable = None  # type: ignore[attr-defined]  # a future while paused
    pause, resume, stop, lost = (
        HTTPChannel.pauseProducing,
        HTTPChannel.resumeProducing,
        HTTPChannel.stopProducing,
        HTTPChannel.connectionLost,
    )

    def wake(channel: Any) -> None:
        waiter = channel._router_writable
        if waiter is not None:
            channel._router_writable = None
            if not waiter.done():
                waiter.set_result(None)

    def pause_producing(self: Any) -> None:
        pause(self)
        if self._router_writable is None:
            self._router_writable = asyncio.get_running_loop().create_future()

    def resume_producing(self: Any) -> None:
        resume(self)
        wake(self)

    def stop_producing(self: Any) -> None:
        stop(self)
        wake(self)

    def connection_lost(self: Any, reason: Any) -> None:
        try:
            lost(self, reason)
        finally:
            wake(self)

    check_headers = Server.check_headers_type

    async def handle_reply(self: Any, protocol: Any, message: dict[str, Any]) -> None:
        # As daphne's own: nothing for a closed connection, header types checked (a 500 if
        # wrong), the protocol writes; then the wait.
        details = self.connections.get(protocol)
        if details is None or details.get("disconnected"):
            return
        if message["type"] == "http.response.start":
            try:
                check_headers(message)
            except ValueError:
                protocol.basic_error(500, b"Server Error", "Server Error")
                raise
        protocol.handle_reply(message)
        # The HTTP channel (Twisted drops it once the reply is finished; a websocket has none).
        waiter = getattr(getattr(protocol, "channel", None), "_router_writable", None)
        if waiter is not None:
            await asyncio.shield(waiter)

    HTTPChannel.pauseProducing = pause_producing  # type: ignore[method-assign]
    HTTPChannel.resumeProducing = resume_producing  # type: ignore[method-assign]
    HTTPChannel.stopProducing = stop_producing  # type: ignore[method-assign]
    HTTPChannel.connectionLost = connection_lost  # type: ignore[method-assign]
    Server.handle_reply = handle_reply  # type: ignore[method-assign]


def _kill_applications_after_drain() -> None:
    """daphne cancels every application in a "before shutdown" trigger; make it drain first."""
    from daphne.server import Server  # daphne only
    from twisted.internet import defer  # daphne only

    async def kill_after_drain(server: Any) -> None:
        await lifecycle.drain()
        running = [d.get("application_instance") for d in list(server.connections.values())]
        pending = [app for app in running if app is not None and not app.done()]
        for app in pending:
            app.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def kill_all_applications(self: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromFuture(asyncio.ensure_future(kill_after_drain(self)))

    Server.kill_all_applications = kill_all_applications  # type: ignore[method-assign]
