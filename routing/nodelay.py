"""TCP_NODELAY on daphne's accepted connections.

Daphne writes a response as several small writes (headers, then each body chunk).
With Nagle's algorithm on, a small write waits for the ACK of the previous one, and a
client with delayed ACKs holds that ACK for up to 40 ms: a ~40 ms p99 at concurrency 1.
Twisted leaves Nagle on, so the router turns it off for every connection it accepts.
uvicorn already sets TCP_NODELAY itself.

The same hook makes daphne's requests skip Twisted's form parsing: for every POST
Twisted parses the Content-Type header with the `email` package (about 5% of the
router's CPU under load) to find form uploads for `request.args`, which daphne never
reads; it hands the raw body to the application.

And daphne's TCP sockets listen with a backlog of 2048 (uvicorn's default)
instead of Twisted's 50: while the event loop is busy relaying streams, a burst of new
connections otherwise overflows the queue, and each dropped SYN costs its client a
1 to 3 s retransmit (1,000 streams opened within a second lost a third of their SYNs).
"""

from __future__ import annotations

import sys
from typing import Any

LISTEN_BACKLOG = 2048


def install() -> None:
    if "daphne.server" not in sys.modules:
        return
    from daphne.http_protocol import HTTPFactory, WebRequest

    if getattr(HTTPFactory, "_router_nodelay", False):
        return
    original = HTTPFactory.buildProtocol
    request_factory = _without_form_parsing(WebRequest)

    def build_protocol(self: Any, addr: Any) -> Any:
        protocol = original(self, addr)
        if protocol is not None:
            if request_factory is not None:
                protocol.requestFactory = request_factory
            made = protocol.connectionMade

            def connection_made() -> None:
                try:
                    protocol.transport.setTcpNoDelay(True)
                except Exception:  # not a TCP transport (unix socket)
                    pass
                made()

            protocol.connectionMade = connection_made
        return protocol

    HTTPFactory.buildProtocol = build_protocol  # type: ignore[method-assign]
    HTTPFactory._router_nodelay = True  # type: ignore[attr-defined]
    _raise_listen_backlog()


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
