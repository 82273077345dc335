"""The queue discipline of one model's waiters: priority, then turns between clients, then arrival.

Order of service (`peek`), all under the board's lock, never awaiting:

1. The highest *effective* priority first. Levels: 0 high, 1 normal, 2 low. A waiter that has
   waited `aging` seconds moves up one level, and one more level for each further `aging`
   seconds (never above 0), so a low request is not starved by a steady stream of high ones.
2. Within a level, clients take turns: the client whose last slot (anywhere on the board,
   given by `last_served`) is oldest goes first, a client that never had one before any
   that had. One client with 100 queued requests therefore does not make another client's
   single request wait behind them: the other is served at the next free slot.
3. Within one client (and level), arrival order.

Invariants: every queued entry is in exactly one client's deque; `len()` is the number of
entries; `peek()` is deterministic for a given state, `now` and `last_served`; the cost of
`peek` is O(number of clients waiting), of `push` O(1), of `remove` O(entries of its client).

No starvation: once an entry is the head of its client's deque and has reached level 0,
every client served ahead of it is restamped above it, so (while its own client gets no
slot elsewhere) it is served within (number of distinct clients waiting) pops.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

HIGH, NORMAL, LOW = 0, 1, 2
LEVELS = {"high": HIGH, "normal": NORMAL, "low": LOW}

Flow = tuple[int, str]  # (priority level, client name)


@dataclass(slots=True, eq=False)
class Entry(Generic[T]):
    """One queued waiter. `since`: time.monotonic() seconds at arrival; `seq`: arrival order."""

    item: T
    client: str
    level: int
    since: float
    seq: int = 0
    queued: bool = field(default=True)


class FairQueue(Generic[T]):
    """Waiters of one model. Not thread-safe: the owner (the board) holds its lock around every call."""

    def __init__(self, aging: float) -> None:
        """aging: seconds of waiting that lift an entry one priority level (0 or less: never)."""
        self._aging = aging if aging > 0 else math.inf
        self._flows: dict[Flow, deque[Entry[T]]] = {}
        self._len = 0
        self._seq = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Entry[T]]:
        for flow in self._flows.values():
            yield from flow

    def push(self, item: T, client: str, level: int, now: float) -> Entry[T]:
        """Queue `item` for `client` at priority `level` (0-2); returns its entry (to remove it)."""
        self._seq += 1
        entry = Entry(item, client, min(max(level, HIGH), LOW), now, self._seq)
        flow = (entry.level, client)
        queue = self._flows.get(flow)
        if queue is None:
            queue = self._flows[flow] = deque()
        queue.append(entry)
        self._len += 1
        return entry

    def remove(self, entry: Entry[T]) -> bool:
        """Take `entry` out (served, timed out or cancelled); False if it was no longer queued."""
        if not entry.queued:
            return False
        flow = (entry.level, entry.client)
        queue = self._flows.get(flow)
        if queue is None:
            return False  # an entry of another queue (one cleared meanwhile)
        if queue[0] is entry:
            queue.popleft()
        else:
            try:
                queue.remove(entry)  # identity: Entry compares by identity (eq=False)
            except ValueError:
                return False
        if not queue:
            del self._flows[flow]
        entry.queued = False
        self._len -= 1
        return True

    def effective_level(self, entry: Entry[T], now: float) -> int:
        """The entry's level after aging: one level up per `aging` seconds waited, at most to 0."""
        waited = now - entry.since
        if waited < self._aging:
            return entry.level
        return max(HIGH, entry.level - int(waited // self._aging))

    def peek(
        self, now: float, last_served: Mapping[str, int], skip: Collection[Entry[T]] = ()
    ) -> Entry[T] | None:
        """The entry to serve next (not removed), or None when empty.

        last_served: client name -> a counter value stamped when the client last got a slot
        (higher is more recent; absent: never). skip: entries passed over (the board's waiters
        held back by their strategy); a client whose head is skipped is represented by its
        first entry not skipped, so the order of everyone else is unchanged."""
        best: Entry[T] | None = None
        best_key: tuple[int, int, int] | None = None
        for queue in self._flows.values():
            head = queue[0]
            if skip and head in skip:
                found = next((e for e in queue if e not in skip), None)
                if found is None:
                    continue
                head = found
            key = (self.effective_level(head, now), last_served.get(head.client, -1), head.seq)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def pop(self, now: float, last_served: Mapping[str, int]) -> Entry[T] | None:
        """`peek`, then remove it."""
        entry = self.peek(now, last_served)
        if entry is not None:
            self.remove(entry)
        return entry
