"""The live usage websocket: staff only, current snapshot on connect, then every change.

Every router process publishes its part to the `usage` group; each consumer keeps the
latest part per process and sends the merged view. Sending runs in its own task with a
one-slot mailbox: a slow browser only ever gets the newest snapshot, and never delays
the group or other consumers.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlparse

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from stats.merge import merge
from stats.publisher import GROUP, publisher

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
        self.parts: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, Any] | None = None
        self.wake = asyncio.Event()
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        from routing import lifecycle

        lifecycle.ensure_started()
        own = await publisher.publish_now()  # the current state, also to other pages
        self.parts[own["instance"]] = own
        await self.send_json(merge(self.parts))
        self.sender = asyncio.ensure_future(self._send_loop())

    async def disconnect(self, code: int) -> None:
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.cancel()
        if hasattr(self, "parts"):
            await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def usage_part(self, event: dict[str, Any]) -> None:
        snap = event["snapshot"]
        self.parts[snap["instance"]] = snap
        self.latest = merge(self.parts)  # supersedes whatever was not sent yet
        self.wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            latest, self.latest = self.latest, None
            if latest is not None:
                await self.send_json(latest)
            await asyncio.sleep(MIN_SEND_INTERVAL)


def _origin_ok(scope: dict[str, Any]) -> bool:
    """Same-host origins only (AllowedHostsOriginValidator checks ALLOWED_HOSTS too)."""
    origin = None
    host = None
    for key, value in scope.get("headers", []):
        if key == b"origin":
            origin = value.decode("latin-1")
        elif key == b"host":
            host = value.decode("latin-1")
    if origin is None:
        return True  # non-browser clients send none; the session cookie still has to be valid
    parsed = urlparse(origin)
    trusted = {urlparse(o).netloc for o in settings.CSRF_TRUSTED_ORIGINS}
    return parsed.netloc == host or parsed.netloc in trusted
