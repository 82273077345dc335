"""Publishes usage snapshots: on every change, coalesced to at most 10 a second per process.

Snapshots go to the channel-layer group `usage` (websocket consumers in every process
merge them) and to this process's Server-Sent-Events subscribers. Each subscriber has a
bounded buffer that drops its oldest snapshot when full: a newer one supersedes it, and a
stuck reader never slows the router or the other subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

from channels.layers import get_channel_layer

from routing.core.outage import Outage
from routing.engine.board import board
from stats import snapshot
from stats.recorder import recorder
from stats.types import UsagePart

log = logging.getLogger("stats.publisher")
_sends = Outage(log, "could not publish usage snapshots to the other router processes")
_builds = Outage(log, "could not build a usage snapshot")

GROUP = "usage"
MIN_INTERVAL = 0.1  # at most 10 snapshots a second
HEARTBEAT = 2.0  # publish at least this often, so other processes know this one is alive
SUBSCRIBER_BUFFER = 8
POLL = 0.1  # how often the loop looks for a new database read of the token totals


class Subscriber:
    """A bounded mailbox of snapshots for one reader."""

    def __init__(self, size: int = SUBSCRIBER_BUFFER) -> None:
        self._items: deque[UsagePart] = deque(maxlen=size)  # full: oldest dropped
        self._ready = asyncio.Event()
        self.dropped = 0

    def offer(self, part: UsagePart) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(part)
        self._ready.set()

    async def get(self) -> UsagePart:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class Publisher:
    def __init__(self) -> None:
        # A plain flag, not a threading.Event: notify() runs several times per request and
        # returns at once while a change is already pending (setting a bool is atomic).
        self._dirty = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()
        self.published = 0
        self.last_published = 0.0  # monotonic; any publish counts as the heartbeat

    def notify(self) -> None:
        """Something changed. Cheap, callable from any thread, never raises."""
        if self._dirty:
            return  # the pending snapshot is built after this change: it includes it
        self._dirty = True
        wake, loop = self._wake, self._loop
        if wake is None or loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    async def publish_now(self) -> UsagePart:
        """Build this process's part now, offer it to the SSE subscribers and send it to the
        group (shapes: stats/types.py)."""
        self._dirty = False  # before building: a change from now on makes another snapshot
        usage = snapshot.build()
        db, pending = recorder.parts()
        client_db, client_pending = recorder.client_parts()
        snap: UsagePart = {
            **usage,
            "token_parts": {
                "db_read_at": recorder.db_read_at,
                "db": [(e, m, r[0], r[1], r[2], r[3]) for (e, m), r in db.items()],
                "pending": [(e, m, r[0], r[1], r[2], r[3]) for (e, m), r in pending.items()],
            },
            # tokens and slots by client, merged like token_parts (stats/merge.py)
            "client_parts": {
                "db_read_at": recorder.db_read_at,
                "db": [(c, r[0], r[1], r[2], r[3]) for c, r in sorted(client_db.items())],
                "pending": [(c, r[0], r[1], r[2], r[3]) for c, r in sorted(client_pending.items())],
                "active": board.active_by_client(),
            },
        }
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.offer(snap)
        layer = get_channel_layer()
        if layer is not None:
            try:
                await layer.group_send(GROUP, {"type": "usage.part", "snapshot": snap})
            except Exception as exc:
                _sends.failed(exc)
            else:
                _sends.ok()
        self.published += 1
        self.last_published = time.monotonic()
        return snap

    async def run(self) -> None:
        """Publish on every change (coalesced), after every database read of the token
        totals (so every process's merged tokens are exact again at once, not only at the
        next heartbeat), and at least every HEARTBEAT seconds."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._dirty = True  # changes made before this loop ran are published at once
        last_read = recorder.db_read_at
        while True:
            if not self._dirty:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=POLL)
                except TimeoutError:
                    pass
            self._wake.clear()
            read_at = recorder.db_read_at
            if (
                not self._dirty
                and read_at == last_read
                and time.monotonic() - self.last_published < HEARTBEAT
            ):
                continue
            last_read = read_at
            try:
                await self.publish_now()
            except Exception as exc:
                _builds.failed(exc)
            else:
                _builds.ok()
                self.last_published = time.monotonic()  # retried at the next heartbeat, not at once
            await asyncio.sleep(MIN_INTERVAL)  # coalesce: changes meanwhile make one snapshot


publisher = Publisher()  # its `notify` is connected to the change signals in StatsConfig.ready
