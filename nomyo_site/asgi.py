"""ASGI entry point: the proxy routes take the lean path, everything else Django's normal one.

Built as channels' sample project does: the Django application first (it sets up the
apps), then the modules that need them.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nomyo_site.settings")

from django.core.asgi import get_asgi_application

django_app = get_asgi_application()

import sys  # noqa: E402
from typing import Any  # noqa: E402

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from routing.server import daphne_hooks, front  # noqa: E402
from routing.server.lean_asgi import ProxyHandler, is_proxy_path  # noqa: E402
from routing.server.lifecycle import lifecycle  # noqa: E402
from stats.routing import websocket_urlpatterns  # noqa: E402

proxy_app = ProxyHandler("nomyo_site.proxy_urls")
PLAIN_METHODS = frozenset({"GET", "POST", "DELETE"})


async def http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Proxy routes to the lean handler, `/` to the base-URL answer, the rest to Django.

    HEAD and requests from browsers (an `Origin` header) go through routing/server/front.py; the
    common case, an API client's GET/POST/DELETE, costs one scan of the request headers.
    """
    path = scope["path"]
    if is_proxy_path(path):
        if scope["method"] in PLAIN_METHODS and front.header(scope, b"origin") is None:
            await proxy_app(scope, receive, send)
        else:
            await front.serve(proxy_app, scope, receive, send)
    elif path == "/":
        await front.serve(front.base_url, scope, receive, send)
    else:
        lifecycle.ensure_started()
        if scope["method"] == "HEAD":
            # Django answers HEAD as GET; the body is dropped on the way out. Pages get no CORS.
            await front.serve(django_app, scope, receive, send, stop_streams=False, cors=False)
        else:
            await django_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        # Origin and session checks are per route (stats/routing.py); unknown paths get a 403.
        "websocket": URLRouter(websocket_urlpatterns),
        "lifespan": lifecycle.lifespan,
    }
)


def _tolerate_refused_websocket_handshakes() -> None:
    """daphne 4.2: when autobahn refuses a websocket handshake itself (an Origin header it
    cannot parse answers 400) daphne's onConnect never ran, and its onClose then fails on
    the missing `server` attribute with a traceback in the log. Such a connection never
    opened: there is nothing to close, so onClose returns."""
    if "daphne.server" not in sys.modules:
        return
    from daphne.ws_protocol import WebSocketProtocol  # only under daphne

    on_close = WebSocketProtocol.onClose
    if getattr(on_close, "_router_tolerant", False):
        return

    def tolerant_on_close(self: WebSocketProtocol, wasClean: bool, code: int, reason: str) -> None:
        if not hasattr(self, "server"):
            return
        on_close(self, wasClean, code, reason)

    tolerant_on_close._router_tolerant = True  # type: ignore[attr-defined]
    WebSocketProtocol.onClose = tolerant_on_close  # type: ignore[method-assign]


lifecycle.install_daphne_hooks()
daphne_hooks.install()
_tolerate_refused_websocket_handshakes()
