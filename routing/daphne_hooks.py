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
"""

from __future__ import annotations

import sys
from typing import Any

LISTEN_BACKLOG = 2048


def install() -> None:
    if "daphne.server" not in sys.modules:
        return
    from daphne.http_protocol import HTTPFactory, WebRequest
    from twisted.web.http import HTTPChannel

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
    from daphne.server import Server

    from routing.lean_asgi import is_proxy_path

    original = Server.log_action

    def log_action(self: Any, protocol: str, action: str, details: dict[str, Any]) -> None:
        if protocol == "http" and is_proxy_path(str(details.get("path", "")).partition("?")[0]):
            return
        original(self, protocol, action, details)

    Server.log_action = log_action  # type: ignore[method-assign]


def _raise_listen_backlog() -> None:
    """daphne builds its listening sockets from endpoint strings: add a backlog to tcp ones."""
    import daphne.server

    original = daphne.server.serverFromString

    def server_from_string(reactor: Any, description: str) -> Any:
        if description.startswith(("tcp:", "tcp6:")) and ":backlog=" not in description:
            description += f":backlog={LISTEN_BACKLOG}"
        return original(reactor, description)

    daphne.server.serverFromString = server_from_string  # type: ignore[attr-defined]


def _without_form_parsing(web_request: type) -> type | None:
    """daphne's request class with Twisted's POST form parsing off (None: Twisted too old)."""
    import inspect

    from twisted.web.http import Request

    if "parsePOSTFormSubmission" not in inspect.signature(Request.__init__).parameters:
        return None

    class RawBodyRequest(web_request):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parsePOSTFormSubmission", False)
            super().__init__(*args, **kwargs)

    return RawBodyRequest
