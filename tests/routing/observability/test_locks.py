"""The timed locks: wait metrics and the deadlock guard (routing/observability/locks.py)."""

from __future__ import annotations

import threading
import time

import pytest

from routing.observability import locks
from routing.observability.locks import LockTimeout, TimedLock


def test_it_records_how_long_a_caller_waited():
    lock = TimedLock("test-wait")
    released = threading.Event()

    def hold() -> None:
        with lock:
            released.wait(1)
            time.sleep(0.05)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.01)
    released.set()
    with lock:
        pass
    holder.join()
    assert lock.acquisitions == 2
    assert lock.wait_total >= 0.04 and lock.wait_max >= 0.04


def test_it_fails_loudly_instead_of_deadlocking(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(locks, "LOCK_TIMEOUT", 0.05)
    lock = TimedLock("test-deadlock")
    with lock, pytest.raises(LockTimeout):
        with lock:  # the same thread again: a real deadlock without the guard
            pass
    assert lock.timeouts == 1
    with lock:  # and the lock still works afterwards
        pass
