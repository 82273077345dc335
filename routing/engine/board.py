"""The usage board: active requests per (endpoint, model), selection, and the wait queue.

One lock guards the counters and the queues, so selecting an endpoint and reserving its
slot is one atomic step, and releasing a slot hands it to the next waiter in the same
step. Nothing here awaits while holding the lock.

Which waiter is next is the queue discipline of routing/engine/fair_queue.py: highest
priority first (aged by ROUTER_PRIORITY_AGING), then turns between clients, then arrival
order. The board stamps a client each time it gets a slot (`_served`), the turns' measure.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django.conf import settings

from routing.core.events import Signal
from routing.engine.fair_queue import NORMAL, Entry, FairQueue
from routing.fleet.candidates import Candidate
from routing.fleet.registry import EndpointInfo
from routing.observability.locks import TimedLock

Slot = tuple[int, str]  # (endpoint id, model key)


@dataclass(slots=True)
class Lease:
    """A reserved slot. `release()` is idempotent and synchronous, safe in any `finally`."""

    board: Board | None  # None: an unmetered lease that holds no slot
    candidate: Candidate
    model: str
    released: bool = False
    _also: list[Callable[[], None]] | None = None

    @property
    def endpoint(self) -> EndpointInfo:
        return self.candidate.endpoint

    def on_release(self, callback: Callable[[], None]) -> None:
        """Run a (synchronous, cheap) callback when the slot is released."""
        if self._also is None:
            self._also = []
        self._also.append(callback)

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.board is not None:
                self.board.release(self)
            for callback in self._also or ():
                callback()


@dataclass(slots=True)
class _Waiter:
    candidates: list[Candidate]
    future: asyncio.Future[Lease]
    client: str


MAX_STAMPS = 10_000  # clients remembered for turns; past it the memory starts afresh


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class Board:
    def __init__(self) -> None:
        self._lock = TimedLock("usage")
        self._active: dict[Slot, int] = {}
        self._per_endpoint: dict[int, int] = {}
        self._queues: dict[str, FairQueue[_Waiter]] = {}
        self._queued = 0
        # client name -> tick of its latest slot (turns between clients, fair_queue.py)
        self._served: dict[str, int] = {}
        self._ticks = itertools.count()
        # Sent (outside the lock) after every change of slots or queues.
        self.changed: Signal[[]] = Signal("board.changed")
        # Current limits by endpoint id, from the registry; candidates carry the limit of
        # the moment they were looked up, and a queued request must see admin changes.
        # 0: disabled or deleted, no new slot there.
        self._limits: dict[int, int] = {}

    # -- selection -------------------------------------------------------------------
    def _pick(self, model: str, candidates: list[Candidate]) -> Candidate | None:
        """Loaded first, then least busy for the model, then least busy overall; random ties."""
        best: Candidate | None = None
        best_key: tuple[int, int, int, float] | None = None
        for cand in candidates:
            ep = cand.endpoint
            active = self._active.get((ep.id, model), 0)
            if active >= self._limits.get(ep.id, ep.limit):
                continue
            key = (0 if cand.loaded else 1, active, self._per_endpoint.get(ep.id, 0), random.random())
            if best_key is None or key < best_key:
                best, best_key = cand, key
        return best

    def _reserve(self, model: str, cand: Candidate, client: str) -> Lease:
        if len(self._served) >= MAX_STAMPS and client not in self._served:
            self._served.clear()
        self._served[client] = next(self._ticks)
        slot = (cand.endpoint.id, model)
        self._active[slot] = self._active.get(slot, 0) + 1
        self._per_endpoint[cand.endpoint.id] = self._per_endpoint.get(cand.endpoint.id, 0) + 1
        return Lease(self, cand, model)

    def unmetered(self, model: str, candidates: list[Candidate]) -> Lease:
        """A choice without a slot, for metadata calls (show): loaded first, then least busy."""
        with self._lock:
            best = min(
                candidates,
                key=lambda c: (
                    0 if c.loaded else 1,
                    self._per_endpoint.get(c.endpoint.id, 0),
                    random.random(),
                ),
            )
        return Lease(None, best, model)

    def try_acquire(self, model: str, candidates: list[Candidate], *, client: str = "") -> Lease | None:
        """Select and reserve in one step, unless earlier requests for the model wait.
        client: who asks (the principal's name), for the turns between clients."""
        with self._lock:
            if self._queues.get(model):
                return None
            cand = self._pick(model, candidates)
            lease = self._reserve(model, cand, client) if cand is not None else None
        if lease is not None:
            self.changed.send()
        return lease

    async def acquire(
        self,
        model: str,
        candidates: list[Candidate],
        *,
        timeout: float,
        queue_max: int,
        client: str = "",
        priority: int = NORMAL,
    ) -> Lease:
        """A slot for `model` on one of `candidates`, waiting in the model's queue if none is free.
        client: the principal's name; priority: 0 high, 1 normal, 2 low (fair_queue.py).
        Raises QueueFull (ROUTER_QUEUE_MAX waiting) or QueueTimeout (`timeout` seconds)."""
        lease = self.try_acquire(model, candidates, client=client)
        if lease is not None:
            return lease
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(candidates, future, client)
        entry: Entry[_Waiter] | None = None
        with self._lock:
            # Re-check under the lock: a slot may have freed since try_acquire.
            queue = self._queues.get(model)
            if not queue:
                cand = self._pick(model, candidates)
                if cand is not None:
                    lease = self._reserve(model, cand, client)
            if lease is None:
                if self._queued >= queue_max:
                    raise QueueFull()
                if queue is None:
                    queue = self._queues[model] = FairQueue(settings.ROUTER_PRIORITY_AGING)
                entry = queue.push(waiter, client, priority, time.monotonic())
                self._queued += 1
        self.changed.send()
        if lease is not None:
            return lease
        assert entry is not None
        got: Lease | None = None
        try:
            async with asyncio.timeout(timeout):
                got = await future
            return got
        except TimeoutError:
            raise QueueTimeout() from None
        finally:
            self._leave_queue(model, entry, kept=got is not None)

    def _leave_queue(self, model: str, entry: Entry[_Waiter], *, kept: bool) -> None:
        """A waiter stops waiting (served, timed out or cancelled)."""
        orphan: Lease | None = None
        with self._lock:
            queue = self._queues.get(model)
            if queue is not None and queue.remove(entry):
                self._queued -= 1
                if not queue:
                    del self._queues[model]
            fut = entry.item.future
            if not fut.done():
                fut.cancel()  # so no slot is handed to it from now on
            elif not kept and not fut.cancelled():
                # Granted in the same instant as a timeout or cancellation: the caller
                # will never use the slot, so hand it back (to the next waiter).
                orphan = fut.result()
        if orphan is not None:
            orphan.release()
        else:
            self.changed.send()

    def release(self, lease: Lease) -> None:
        model = lease.model
        ep_id = lease.candidate.endpoint.id
        with self._lock:
            slot = (ep_id, model)
            left = self._active.get(slot, 0) - 1
            if left > 0:
                self._active[slot] = left
            else:
                self._active.pop(slot, None)
            left = self._per_endpoint.get(ep_id, 0) - 1
            if left > 0:
                self._per_endpoint[ep_id] = left
            else:
                self._per_endpoint.pop(ep_id, None)
            self._serve_waiters(model)
        self.changed.send()

    def _serve_waiters(self, model: str) -> None:
        """Hand free slots to waiters in the queue's order (lock held)."""
        queue = self._queues.get(model)
        now = time.monotonic()
        while queue:
            entry = queue.peek(now, self._served)
            assert entry is not None
            waiter = entry.item
            if waiter.future.done():  # timed out or cancelled, leaving
                queue.remove(entry)
                self._queued -= 1
                continue
            cand = self._pick(model, waiter.candidates)
            if cand is None:
                return
            queue.remove(entry)
            self._queued -= 1
            waiter.future.set_result(self._reserve(model, cand, waiter.client))
        if queue is not None and not queue:
            del self._queues[model]

    def apply_endpoints(self, endpoints: Iterable[EndpointInfo]) -> None:
        """The registry reloaded: each endpoint's current limit (0 when disabled)."""
        self.set_limits({ep.id: ep.limit if ep.enabled else 0 for ep in endpoints})

    def set_limits(self, limits: dict[int, int]) -> None:
        """The registry's current view (id -> limit, 0 when disabled); re-runs the queues."""
        with self._lock:
            self._limits = dict(limits)
            for model in list(self._queues):
                self._serve_waiters(model)
        self.changed.send()

    # -- reads -----------------------------------------------------------------------
    def active(self) -> dict[Slot, int]:
        with self._lock:
            return dict(self._active)

    def active_for(self, endpoint_id: int) -> int:
        with self._lock:
            return self._per_endpoint.get(endpoint_id, 0)

    def queued(self) -> dict[str, int]:
        with self._lock:
            return {model: len(q) for model, q in self._queues.items()}

    def queued_total(self) -> int:
        with self._lock:
            return self._queued

    def clear(self) -> None:
        with self._lock:
            self._active.clear()
            self._per_endpoint.clear()
            for queue in self._queues.values():
                for entry in queue:
                    entry.item.future.cancel()
            self._queues.clear()
            self._queued = 0
            self._served.clear()
            self._limits.clear()


board = Board()
