"""A named lock that records how long callers waited for it (exported on /metrics).

The router's shared structures are touched by the event loop and by Django's worker
threads (the admin reads usage and cache state), so they are guarded by threading locks.
They are only ever held for a few dictionary operations and never across an await,
network I/O or a database call, so the event loop never blocks on them for long.
A synchronous lock also means a slot can be released in `finally` without awaiting,
which a second cancellation could otherwise interrupt.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

_all: dict[str, TimedLock] = {}
LOCK_TIMEOUT = 5.0


class LockTimeout(RuntimeError):
    pass


class TimedLock:
    __slots__ = ("_lock", "acquisitions", "name", "timeouts", "wait_max", "wait_total")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.acquisitions = 0
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.timeouts = 0
        _all[name] = self

    def __enter__(self) -> None:
        if self._lock.acquire(blocking=False):
            self.acquisitions += 1
            return
        started = time.perf_counter()
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            # Held for microseconds by design: a wait this long is a bug (a deadlock);
            # fail this caller loudly instead of freezing the whole event loop.
            self.timeouts += 1
            raise LockTimeout(f"lock {self.name!r} not acquired in {LOCK_TIMEOUT} s")
        waited = time.perf_counter() - started
        self.acquisitions += 1
        self.wait_total += waited
        if waited > self.wait_max:
            self.wait_max = waited

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()


def all_locks() -> list[TimedLock]:
    return list(_all.values())
