"""The one observer mechanism: a `Signal` per kind of change, owned by the object that changes.

Receivers are connected at wiring time (`AppConfig.ready`, routing/server/wiring.py and
stats/apps.py), never by importing a module. A sender calls `send()` after it released its own
lock, on its own thread; the receivers run there, in connect order. Receivers must be cheap and
must not raise: one that raises propagates to the sender (a bug, not a condition to handle).

Invariant: the receiver tuple is replaced whole on connect/disconnect (under a lock) and read
without one, so `send()` on the hot path costs one attribute read and a loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, ParamSpec

P = ParamSpec("P")


class Signal(Generic[P]):
    """Observers of one owner's changes. `name` is for reprs and logs only."""

    __slots__ = ("_lock", "_receivers", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._receivers: tuple[Callable[P, None], ...] = ()

    def connect(self, receiver: Callable[P, None]) -> None:
        """Add a receiver; connecting the same one (==) again changes nothing."""
        with self._lock:
            if receiver not in self._receivers:
                self._receivers = (*self._receivers, receiver)

    def disconnect(self, receiver: Callable[P, None]) -> None:
        """Remove a receiver; a receiver that is not connected is ignored."""
        with self._lock:
            self._receivers = tuple(r for r in self._receivers if r != receiver)

    @property
    def receivers(self) -> tuple[Callable[P, None], ...]:
        return self._receivers

    def send(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for receiver in self._receivers:
            receiver(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Signal {self.name}: {len(self._receivers)} receiver(s)>"
