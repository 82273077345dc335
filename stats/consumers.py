"""The live usage websocket: staff only, current snapshot on connect, then every change.
Any other websocket path is refused at the handshake (`no_route`).

Every router process publishes its part to the `usage` group; each consumer keeps the
latest part per process and sends the merged view. Sending runs in its own task with a
one-slot mailbox: a slow browser only ever gets the newest snapshot, and never delays
the group or other consumers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlparse

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from routing.fleet.registry import registry
from routing.server.lifecycle import lifecycle
from stats.merge import STALE_AFTER, merge
from stats.publisher import GROUP, publisher
from stats.types import MergedSnapshot, UsagePart

log = logging.getLogger("stats.consumers")

MIN_SEND_INTERVAL = 0.1


class UsageConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            await self.close(code=4403)
            return
        if not _origin_ok(self.scope):
            await self.close(code=4403)
            return
        self.parts: dict[str, UsagePart] = {}  # instance -> its newest part
        self.latest: MergedSnapshot | None = None
        self.wake = asyncio.Event()
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        lifecycle.ensure_started()
        await registry.all()  # the snapshot reads the registry's cached copy: make sure it is loaded
        own = await publisher.publish_now()  # the current state, also to other pages
        self.parts[own["instance"]] = own
        await self.send_json(merge(self.parts))
        self.sender = asyncio.ensure_future(self._send_loop())

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """The page sends nothing: whatever a client sends is ignored, never decoded (the
        JSON consumer's default would raise on a frame that is not JSON)."""

    async def disconnect(self, code: int) -> None:
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.cancel()
        if hasattr(self, "parts"):
            await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def usage_part(self, event: dict[str, Any]) -> None:
        if not hasattr(self, "parts"):
            return  # not accepted (yet)
        snap: UsagePart = event["snapshot"]
        held = self.parts.get(snap["instance"])
        if held is not None and held.get("taken_at", 0) >= snap.get("taken_at", 0):
            return  # already shown (our own publish on connect) or older than what we have
        self.parts[snap["instance"]] = snap
        # Processes that stopped publishing (restarted with a new id, or gone) are forgotten.
        cutoff = time.time() - 2 * STALE_AFTER
        for instance in [i for i, p in self.parts.items() if p.get("taken_at", 0) < cutoff]:
            del self.parts[instance]
        self.latest = merge(self.parts)  # supersedes whatever was not sent yet
        self.wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            latest, self.latest = self.latest, None
            if latest is not None:
                try:
                    await self.send_json(latest)
                except Exception:  # the connection is going away; disconnect() ends this task
                    log.debug("could not send a usage snapshot", exc_info=True)
            await asyncio.sleep(MIN_SEND_INTERVAL)


async def no_route(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Every other websocket path: refused at the handshake (the server answers HTTP 403),
    before any session or database work, and without a log line. ASGI websocket spec:
    a `websocket.close` sent before `websocket.accept` rejects the connection."""
    message = await receive()
    if message.get("type") == "websocket.connect":
        await send({"type": "websocket.close", "code": 4404})


def origin_parsable(inner: Any) -> Any:
    """ASGI wrapper: a handshake whose Origin header urllib cannot parse (`http://[`, a port
    over 65535) is refused like an unknown path. channels' origin validator parses it
    unguarded and would fail the handshake with a 500 and a traceback."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        for key, value in scope.get("headers", ()):
            if key == b"origin":
                try:
                    parsed = urlparse(value.decode("latin-1"))
                    _ = parsed.hostname, parsed.port
                except ValueError:
                    await no_route(scope, receive, send)
                    return
        await inner(scope, receive, send)

    return app


def _origin_ok(scope: dict[str, Any]) -> bool:
    """Same-origin pages only: the Origin's host and port must be the Host the browser
    connected to (or a CSRF-trusted origin). AllowedHostsOriginValidator, in front of
    this consumer, has already refused a missing Origin and hosts not in ALLOWED_HOSTS,
    but it ignores ports: another site on the same host would pass it."""
    origin = None
    host = None
    for key, value in scope.get("headers", []):
        if key == b"origin":
            origin = value.decode("latin-1").lower()
        elif key == b"host":
            host = value.decode("latin-1").lower()
    if origin is None:
        return True  # non-browser clients send none; the session cookie still has to be valid
    parsed = urlparse(origin)
    trusted = {urlparse(o.lower()).netloc for o in settings.CSRF_TRUSTED_ORIGINS}
    return parsed.netloc == host or parsed.netloc in trusted
