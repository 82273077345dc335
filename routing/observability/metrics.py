"""Prometheus metrics, kept in-process and rendered in the text exposition format.

Each router process counts only its own traffic and labels it with its `instance`
(host:pid), so several processes behind one scrape never overwrite each other's numbers.
Updates are plain dict operations on the event loop thread; rendering copies under a lock.
"""

from __future__ import annotations

import bisect
import math
import os
import socket
import threading
from collections.abc import Iterable

from routing.observability.locks import all_locks

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"
_lock = threading.Lock()

LabelKey = tuple[tuple[str, str], ...]


def _labels(key: LabelKey) -> str:
    pairs = (("instance", INSTANCE), *key)
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _num(value: float) -> str:
    """Exact: a token counter in the millions must not be rounded to six digits (`:g` did)."""
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[LabelKey, float] = {}
        _registry.append(self)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with _lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with _lock:
            items = list(self._values.items())
        for key, value in items:
            yield f"{self.name}{_labels(key)} {_num(value)}"


class Histogram:
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        # Per label set: the count of each bucket alone (+Inf last), then sum and count;
        # observing touches one bucket, rendering adds them up into Prometheus' cumulative form.
        self._values: dict[LabelKey, list[float]] = {}
        _registry.append(self)

    def observe(self, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        at = bisect.bisect_left(self.BUCKETS, seconds)  # the first bound >= seconds
        with _lock:
            row = self._values.get(key)
            if row is None:
                row = self._values[key] = [0.0] * (len(self.BUCKETS) + 3)
            row[at] += 1
            row[-2] += seconds
            row[-1] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with _lock:
            items = [(k, list(v)) for k, v in self._values.items()]
        for key, row in items:
            running = 0.0
            for i, bound in enumerate(self.BUCKETS):
                running += row[i]
                yield f"{self.name}_bucket{_labels((*key, ('le', f'{bound:g}')))} {_num(running)}"
            yield f"{self.name}_bucket{_labels((*key, ('le', '+Inf')))} {_num(row[-1])}"
            yield f"{self.name}_sum{_labels(key)} {_num(row[-2])}"
            yield f"{self.name}_count{_labels(key)} {_num(row[-1])}"


_registry: list[Counter | Histogram] = []

requests = Counter("router_requests_total", "Proxied requests by route, endpoint, model and status.")
tokens = Counter("router_tokens_total", "Tokens reported by backends, by endpoint, model and direction.")
failovers = Counter("router_failovers_total", "Requests retried on another endpoint.")
fresh_retries = Counter(
    "router_fresh_connection_retries_total",
    "Requests re-sent on a fresh connection to the same endpoint after a pooled one closed unanswered.",
)
_first_byte = Histogram("router_upstream_first_byte_seconds", "Time to the upstream's first byte.")
duration = Histogram("router_request_duration_seconds", "Whole request duration, by route.")
_queue_wait = Histogram("router_queue_wait_seconds", "Time spent waiting for a free slot.")


def count_tokens(endpoint: str, model: str, prompt: int, completion: int) -> None:
    """The tokens one reply reported (endpoint: its url; model: the model key)."""
    tokens.inc(prompt, endpoint=endpoint, model=model, direction="input")
    tokens.inc(completion, endpoint=endpoint, model=model, direction="output")


def first_byte(route: str, seconds: float) -> None:
    _first_byte.observe(seconds, route=route)


def queue_wait(seconds: float) -> None:
    _queue_wait.observe(seconds)


# (series, type, help, TimedLock attribute): the lock monitoring the design note asks for.
_LOCK_SERIES = (
    ("router_lock_wait_seconds_total", "counter", "Time spent waiting for each lock.", "wait_total"),
    ("router_lock_wait_max_seconds", "gauge", "Longest single wait for each lock.", "wait_max"),
    ("router_lock_acquisitions_total", "counter", "Acquisitions of each lock.", "acquisitions"),
    ("router_lock_timeouts_total", "counter", "Acquisitions that gave up (a deadlock guard).", "timeouts"),
)


def render(gauges: Iterable[str]) -> str:
    lines: list[str] = []
    for metric in _registry:
        lines.extend(metric.render())
    lines.extend(gauges)
    locks = all_locks()
    for name, kind, help_text, attr in _LOCK_SERIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for lock in locks:
            lines.append(f"{name}{_labels((('lock', lock.name),))} {_num(getattr(lock, attr))}")
    return "\n".join(lines) + "\n"
