"""The usage board: active requests per (endpoint, model), the wait queue, and the calls into
the selection strategy (routing/engine/selection.py).

One lock guards the counters and the queues, so selecting an endpoint (the strategy's
`pick`, called under the lock) and reserving its slot is one atomic step, and releasing a
slot hands it to the next waiter in the same step. Nothing here awaits while holding the
lock. The board also keeps the moving average of time to first byte per (endpoint, model),
folded in when a lease that measured it is released.

Which waiter is next is the queue discipline of routing/engine/fair_queue.py: highest
priority first (aged by ROUTER_PRIORITY_AGING), then turns between clients, then arrival
order. The board stamps a client each time it gets a slot (`_served`), the turns' measure.

ROUTER_QUEUE_MAX bounds the requests waiting, not the entries in queues: an alias whose
targets are different real models waits in each of their queues at once (routing/engine/
proxy.py `_acquire_any`), under one `request` token, and counts once (`_waiting`).

A strategy with a `hold` (prompt-cache affinity, routing/engine/affinity.py) may decline free
slots for a waiter for up to `hold` seconds after it first asked (it waits for its own server).
Such a waiter keeps its place: the next waiters in the queue's order are served past it, and
a new request is queued and served in that same order (not refused because someone waits).
When its hold ends, the waiter itself asks the board to serve the queue again, and from then
on it is served like any other. Without a hold nothing changes: a None from the strategy
means nothing is free and the queue waits.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django.conf import settings

from routing.core.events import Signal
from routing.engine.fair_queue import NORMAL, Entry, FairQueue
from routing.engine.selection import Ask, Load, SelectionStrategy, Slot, TieredLeastBusy
from routing.fleet.candidates import Candidate
from routing.fleet.registry import EndpointInfo
from routing.observability.locks import TimedLock

FIRST_BYTE_WEIGHT = 0.2  # weight of the newest time to first byte in the moving average


@dataclass(slots=True)
class Lease:
    """A reserved slot. `release()` is idempotent and synchronous, safe in any `finally`."""

    board: Board | None  # None: an unmetered lease that holds no slot
    candidate: Candidate
    model: str
    client: str = ""  # who holds it (the principal's name)
    released: bool = False
    _also: list[Callable[[], None]] | None = None
    # Seconds to the upstream's first byte, set by the forwarding engine once measured;
    # folded into the board's moving average when the lease is released.
    first_byte: float | None = None
    ask: Ask | None = None  # the request it was reserved for (a strategy's `released` hook reads it)

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
    ask: Ask
    candidates: list[Candidate]
    future: asyncio.Future[Lease]
    client: str
    request: object  # the request it waits for (one request may wait in several queues)


def _hold_of(strategy: SelectionStrategy) -> float:
    """Seconds the strategy may decline free slots for a waiter (its optional `hold`), else 0."""
    return float(getattr(strategy, "hold", 0.0) or 0.0)


def _released_of(strategy: SelectionStrategy) -> Callable[[Ask, Candidate], None] | None:
    """The strategy's optional `released(ask, candidate)`, called under the board's lock when a
    slot it placed is given back (no I/O, no await, no other lock, as `pick`)."""
    hook = getattr(strategy, "released", None)
    return hook if callable(hook) else None


MAX_STAMPS = 10_000  # clients remembered for turns; past it the memory starts afresh


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class Board:
    def __init__(self, strategy: SelectionStrategy | None = None) -> None:
        self._lock = TimedLock("usage")
        self._strategy: SelectionStrategy = strategy or TieredLeastBusy()
        self._hold = _hold_of(self._strategy)
        self._released = _released_of(self._strategy)
        self._active: dict[Slot, int] = {}
        self._per_endpoint: dict[int, int] = {}
        self._queues: dict[str, FairQueue[_Waiter]] = {}
        self._waiting: dict[object, int] = {}  # request token -> queues it waits in
        # client name -> tick of its latest slot (turns between clients, fair_queue.py)
        self._served: dict[str, int] = {}
        self._ticks = itertools.count()
        self._by_client: dict[str, int] = {}  # client name -> slots held
        # Sent (outside the lock) after every change of slots or queues.
        self.changed: Signal[[]] = Signal("board.changed")
        # Current limits by endpoint id, from the registry; candidates carry the limit of
        # the moment they were looked up, and a queued request must see admin changes.
        # 0: disabled or deleted, no new slot there.
        self._limits: dict[int, int] = {}
        self._first_byte: dict[Slot, float] = {}
        # The strategy's view of the dicts above, built once; they are only ever changed in place.
        self._load = Load(self._active, self._per_endpoint, self._limits, self._first_byte)

    # -- selection -------------------------------------------------------------------
    @property
    def strategy(self) -> SelectionStrategy:
        return self._strategy

    def use(self, strategy: SelectionStrategy) -> None:
        """Select with `strategy` from the next pick on (queued requests included)."""
        with self._lock:
            self._strategy = strategy
            self._hold = _hold_of(strategy)
            self._released = _released_of(strategy)

    def _reserve(self, ask: Ask, cand: Candidate, client: str) -> Lease:
        model = ask.model
        if len(self._served) >= MAX_STAMPS and client not in self._served:
            self._served.clear()
        self._served[client] = next(self._ticks)
        self._by_client[client] = self._by_client.get(client, 0) + 1
        slot = (cand.endpoint.id, model)
        self._active[slot] = self._active.get(slot, 0) + 1
        self._per_endpoint[cand.endpoint.id] = self._per_endpoint.get(cand.endpoint.id, 0) + 1
        return Lease(self, cand, model, client, ask=ask)

    def unmetered(self, model: str, candidates: list[Candidate], *, affinity: str | None = None) -> Lease:
        """A choice without a slot, for metadata calls (show), by the same strategy.
        ValueError when `candidates` is empty."""
        with self._lock:
            best = self._strategy.pick(Ask(model, affinity), candidates, self._load, metered=False)
        if best is None:
            raise ValueError(f"no candidate for {model!r}")
        return Lease(None, best, model)

    def try_acquire(
        self, model: str, candidates: list[Candidate], *, affinity: str | None = None, client: str = ""
    ) -> Lease | None:
        """Select and reserve in one step, unless earlier requests for the model wait.
        affinity: the request's conversation key, for strategies that use one; client: who
        asks (the principal's name), for the turns between clients."""
        return self._try_acquire(Ask(model, affinity), candidates, client)

    def _try_acquire(self, ask: Ask, candidates: list[Candidate], client: str) -> Lease | None:
        model = ask.model
        with self._lock:
            if self._queues.get(model):
                return None
            cand = self._strategy.pick(ask, candidates, self._load, metered=True)
            lease = self._reserve(ask, cand, client) if cand is not None else None
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
        affinity: str | None = None,
        client: str = "",
        priority: int = NORMAL,
        request: object | None = None,
    ) -> Lease:
        """A slot on one of `candidates` for `model`, now or after waiting in the model's queue
        for at most `timeout` seconds. client: the principal's name; priority: 0 high, 1 normal,
        2 low (the queue's order: fair_queue.py). request: a token the same for every queue one
        request waits in at once (None: this call alone). QueueFull when `queue_max` other
        requests already wait, QueueTimeout when the wait runs out."""
        ask = Ask(model, affinity)
        lease = self._try_acquire(ask, candidates, client)
        if lease is not None:
            return lease
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        token = object() if request is None else request
        waiter = _Waiter(ask, candidates, future, client, token)
        entry: Entry[_Waiter] | None = None
        with self._lock:
            # Re-check under the lock: a slot may have freed since try_acquire.
            queue = self._queues.get(model)
            if not queue:
                cand = self._strategy.pick(ask, candidates, self._load, metered=True)
                if cand is not None:
                    lease = self._reserve(ask, cand, client)
            if lease is None:
                if token not in self._waiting and len(self._waiting) >= queue_max:
                    raise QueueFull()
                if queue is None:
                    queue = self._queues[model] = FairQueue(settings.ROUTER_PRIORITY_AGING)
                entry = queue.push(waiter, client, priority, time.monotonic())
                self._waiting[token] = self._waiting.get(token, 0) + 1
                if self._hold:  # waiters ahead may be holding out for their own server
                    self._serve_waiters(model)
        self.changed.send()
        if lease is not None:
            return lease
        assert entry is not None
        got: Lease | None = None
        hold_until = ask.since + self._hold if self._hold and affinity is not None else None
        try:
            async with asyncio.timeout(timeout):
                while hold_until is not None and not future.done():
                    left = hold_until - time.monotonic()
                    if left > 0:
                        await asyncio.wait((future,), timeout=left)
                        continue
                    hold_until = None  # the hold is over: from now on a waiter like any other
                    with self._lock:
                        self._serve_waiters(model)
                    self.changed.send()
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
                self._left(entry.item)
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
        slot = (ep_id, model)
        seconds = lease.first_byte
        with self._lock:
            if seconds is not None:
                average = self._first_byte.get(slot)
                self._first_byte[slot] = (
                    seconds if average is None else average + FIRST_BYTE_WEIGHT * (seconds - average)
                )
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
            left = self._by_client.get(lease.client, 0) - 1
            if left > 0:
                self._by_client[lease.client] = left
            else:
                self._by_client.pop(lease.client, None)
            if self._released is not None and lease.ask is not None:
                self._released(lease.ask, lease.candidate)
            self._serve_waiters(model)
        self.changed.send()

    def _serve_waiters(self, model: str) -> None:
        """Hand free slots to waiters in the queue's order (lock held). A waiter the strategy
        holds back while one of its candidates is free is passed over, keeping its place."""
        queue = self._queues.get(model)
        now = time.monotonic()
        held: set[Entry[_Waiter]] | None = None  # made only when a strategy holds one back
        while queue:
            entry = queue.peek(now, self._served, held or ())
            if entry is None:  # every waiter left is held back
                break
            waiter = entry.item
            if waiter.future.done():  # timed out or cancelled, leaving
                queue.remove(entry)
                self._left(waiter)
                continue
            cand = self._strategy.pick(waiter.ask, waiter.candidates, self._load, metered=True)
            if cand is None:
                if self._hold and any(self._load.has_free_slot(c, model) for c in waiter.candidates):
                    if held is None:
                        held = set()
                    held.add(entry)
                    continue
                break
            queue.remove(entry)
            self._left(waiter)
            waiter.future.set_result(self._reserve(waiter.ask, cand, waiter.client))
        if queue is not None and not queue:
            del self._queues[model]

    def _left(self, waiter: _Waiter) -> None:
        """`waiter` left its queue (lock held): its request counts while it waits in another."""
        n = self._waiting.get(waiter.request, 0) - 1
        if n > 0:
            self._waiting[waiter.request] = n
        else:
            self._waiting.pop(waiter.request, None)

    def apply_endpoints(self, endpoints: Iterable[EndpointInfo]) -> None:
        """The registry reloaded: each endpoint's current limit (0 when disabled)."""
        self.set_limits({ep.id: ep.limit if ep.enabled else 0 for ep in endpoints})

    def set_limits(self, limits: dict[int, int]) -> None:
        """The registry's current view (id -> limit, 0 when disabled); re-runs the queues."""
        with self._lock:
            self._limits.clear()  # in place: self._load reads this dict
            self._limits.update(limits)
            for model in list(self._queues):
                self._serve_waiters(model)
        self.changed.send()

    # -- reads -----------------------------------------------------------------------
    def active(self) -> dict[Slot, int]:
        with self._lock:
            return dict(self._active)

    def first_byte(self) -> dict[Slot, float]:
        """The moving average of time to first byte, seconds, per (endpoint id, model key)."""
        with self._lock:
            return dict(self._first_byte)

    def active_for(self, endpoint_id: int) -> int:
        with self._lock:
            return self._per_endpoint.get(endpoint_id, 0)

    def active_by_client(self) -> dict[str, int]:
        """Slots held per client (the principal's name; "" for callers that named none)."""
        with self._lock:
            return dict(self._by_client)

    def queued(self) -> dict[str, int]:
        with self._lock:
            return {model: len(q) for model, q in self._queues.items()}

    def queued_total(self) -> int:
        """Requests waiting (one that waits in several queues counts once)."""
        with self._lock:
            return len(self._waiting)

    def clear(self) -> None:
        with self._lock:
            self._active.clear()
            self._per_endpoint.clear()
            self._by_client.clear()
            for queue in self._queues.values():
                for entry in queue:
                    entry.item.future.cancel()
            self._queues.clear()
            self._waiting.clear()
            self._served.clear()
            self._limits.clear()
            self._first_byte.clear()
            forget = getattr(self._strategy, "clear", None)  # a strategy's own memory (affinity)
            if callable(forget):
                forget()


board = Board()
