"""One circuit breaker per endpoint: whether it is in rotation, why not, and since when.

States (the usual circuit-breaker states):

- ``closed``: in rotation. Absent from the table means closed with no recent failure.
- ``open``: out of rotation; requests do not go there. It opens at once on *strong*
  evidence about the server (connection refused, connect timeout, a failed probe), or
  after ``threshold`` *weak* failures in a row (a 5xx reply, a reply cut mid-way) with no
  good reply in between, so one client's bad request cannot take the server out for others.
- ``half_open``: a probe answered; requests go there again as the trial. The first good
  reply or the next good probe closes it; any failure opens it again.

``since`` (wall clock, seconds) is when the endpoint left ``closed``; it does not restart
while the outage lasts (probes failing again, open <-> half_open), so pages show how long
it has really been out. Only closing forgets it.

Invariants: this module owns the table and its one lock; the lock is held for a few dict
operations, never across I/O. ``succeeded()`` is on the hot path: for an endpoint with no
recent failure it is one dict membership test and takes no lock.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from routing.core.events import Signal
from routing.observability.locks import TimedLock

log = logging.getLogger("routing.breaker")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class View:
    """One endpoint's breaker as pages and metrics show it."""

    state: State
    reason: str | None  # the latest evidence (None when closed without failures)
    since: float | None  # wall clock when it left closed; None while closed
    failures: int  # weak failures in a row (closed) or evidence seen since it opened


CLOSED = View(State.CLOSED, None, None, 0)


@dataclass(slots=True)
class _Entry:
    state: State
    reason: str
    since: float | None
    failures: int


class Breakers:
    def __init__(self, threshold: Callable[[], int]) -> None:
        self._threshold = threshold
        self._lock = TimedLock("breaker")
        self._entries: dict[int, _Entry] = {}
        # Sent (outside the lock) when an endpoint enters or leaves rotation.
        self.changed: Signal[[]] = Signal("breakers.changed")

    # -- evidence ------------------------------------------------------------------------
    def failed(self, endpoint_id: int, reason: str, *, strong: bool, name: str = "") -> bool:
        """Record one failure about the server; True when this opened the breaker."""
        now = time.time()
        with self._lock:
            entry = self._entries.get(endpoint_id)
            if entry is None:
                entry = self._entries[endpoint_id] = _Entry(State.CLOSED, reason, None, 0)
            entry.failures += 1
            entry.reason = reason
            before = entry.state
            if before is State.HALF_OPEN or (
                before is State.CLOSED and (strong or entry.failures >= self._threshold())
            ):
                if entry.since is None:
                    entry.since = now
                entry.state = State.OPEN
            changed = entry.state is not before
        if changed:
            if before is State.CLOSED:
                log.warning("endpoint %s out of rotation (breaker open): %s", name or endpoint_id, reason)
            self.changed.send()
        return changed and before is State.CLOSED

    def succeeded(self, endpoint_id: int) -> None:
        """A complete normal reply (any status below 500, read to its end) from the endpoint:
        closes a half-open breaker and forgets weak failures. An open one is left to its probe."""
        if endpoint_id not in self._entries:  # the common case: nothing to forget, no lock
            return
        with self._lock:
            entry = self._entries.get(endpoint_id)
            if entry is None or entry.state is State.OPEN:
                return
            closed = entry.state is State.HALF_OPEN
            del self._entries[endpoint_id]
        if closed:
            log.info("endpoint %s back in rotation (breaker closed)", endpoint_id)
            self.changed.send()

    def probe_succeeded(self, endpoint_id: int) -> State:
        """A probe answered: open -> half_open, half_open -> closed. Returns the new state."""
        with self._lock:
            entry = self._entries.get(endpoint_id)
            if entry is None or entry.state is State.CLOSED:
                return State.CLOSED
            if entry.state is State.OPEN:
                entry.state = State.HALF_OPEN
                new = State.HALF_OPEN
            else:
                del self._entries[endpoint_id]
                new = State.CLOSED
        self.changed.send()
        return new

    def reset(self, endpoint_id: int) -> None:
        """Close at once (an operator's successful check); no-op when closed."""
        with self._lock:
            removed = self._entries.pop(endpoint_id, None)
        if removed is not None and removed.state is not State.CLOSED:
            self.changed.send()

    # -- reads -------------------------------------------------------------------------
    def view(self, endpoint_id: int) -> View:
        with self._lock:
            entry = self._entries.get(endpoint_id)
            return CLOSED if entry is None else View(entry.state, entry.reason, entry.since, entry.failures)

    def is_open(self, endpoint_id: int) -> bool:
        """Out of rotation: no request is sent there."""
        if endpoint_id not in self._entries:
            return False
        with self._lock:
            entry = self._entries.get(endpoint_id)
            return entry is not None and entry.state is State.OPEN

    def snapshot(self) -> dict[int, View]:
        """Endpoints whose breaker is not plainly closed (absent ids are closed)."""
        with self._lock:
            return {
                eid: View(e.state, e.reason, e.since, e.failures)
                for eid, e in self._entries.items()
                if e.state is not State.CLOSED
            }

    def forget(self, endpoint_id: int | None = None) -> None:
        """Drop what is known (the endpoint changed or was removed; None: all)."""
        with self._lock:
            if endpoint_id is None:
                self._entries.clear()
            else:
                self._entries.pop(endpoint_id, None)


def _threshold() -> int:
    return max(1, int(settings.ROUTER_BREAKER_FAILURES))


breakers = Breakers(_threshold)
