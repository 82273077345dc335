"""Prometheus metrics of this process, exposed with prometheus_client in the text format 0.0.4.

Each router process counts only its own traffic; every sample gets the process's `instance`
(host:pid) label when it is collected, so several processes behind one scrape never overwrite
each other's numbers. Exposition, label escaping and the `process_*` metrics come from
prometheus_client (https://prometheus.github.io/client_python/).

Hot path: a request updates a handful of series. prometheus_client's `labels()` takes the
family's lock on every call, so the child of each label set is looked up once and kept in a
plain dict (`_children`); after that an update is the child's own `inc`/`observe`. The label
values are bounded: `route` by the route table (anything else is "other"), `endpoint` by the
configured endpoints' names, `model` by what they advertise, `status` by HTTP status codes.

Invariants: the names, types, labels and buckets of the series below are a documented
interface (README, tests/reliability/test_observability.py); `render()` never raises on
content (escaping is the library's), and collecting takes no lock of the hot path's but the
children's own, for a moment.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from routing.observability.locks import all_locks

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"
# The classic text format (0.0.4), which every Prometheus reads; prometheus_client 0.26's
# CONTENT_TYPE_LATEST names the 1.0.0 variant.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)  # seconds

disable_created_metrics()  # no `_created` series: they double the output and nobody here reads them
_OWN = CollectorRegistry(auto_describe=False)

requests = Counter(
    "router_requests",
    "Proxied requests by route, endpoint and status.",
    ["route", "endpoint", "status"],
    registry=_OWN,
)
tokens = Counter(
    "router_tokens",
    "Tokens reported by backends, by endpoint, model and direction.",
    ["endpoint", "model", "direction"],
    registry=_OWN,
)
failovers = Counter("router_failovers", "Requests retried on another endpoint.", registry=_OWN)
fallbacks = Counter(
    "router_fallbacks", "Requests moved on to the next model of their fallback chain.", registry=_OWN
)
fresh_retries = Counter(
    "router_fresh_connection_retries",
    "Requests re-sent on a fresh connection to the same endpoint after a pooled one closed unanswered.",
    registry=_OWN,
)
image_retries = Counter(
    "router_image_retries",
    "Requests re-sent without their images to a model that cannot see, by endpoint and model.",
    ["endpoint", "model"],
    registry=_OWN,
)
context_trims = Counter(
    "router_context_trims",
    "Conversations trimmed to fit a server's context (before sending or on its refusal), by endpoint, model.",
    ["endpoint", "model"],
    registry=_OWN,
)
_first_byte = Histogram(
    "router_upstream_first_byte_seconds",
    "Time to the upstream's first byte.",
    ["route"],
    buckets=BUCKETS,
    registry=_OWN,
)
duration = Histogram(
    "router_request_duration_seconds",
    "Whole request duration, by route.",
    ["route"],
    buckets=BUCKETS,
    registry=_OWN,
)
_queue_wait = Histogram(
    "router_queue_wait_seconds", "Time spent waiting for a free slot.", buckets=BUCKETS, registry=_OWN
)

# By client (issue 14): the principal's name (a client key's name, "anonymous" or "operator"),
# bounded by the keys defined. Counted only for requests that passed authentication.
client_requests = Counter(
    "router_client_requests",
    "Authenticated requests by client and status.",
    ["client", "status"],
    registry=_OWN,
)
client_tokens = Counter(
    "router_client_tokens",
    "Tokens reported by backends, by client and direction.",
    ["client", "direction"],
    registry=_OWN,
)
quota_admissions = Counter(
    "router_quota_admissions",
    "Client-key admissions by how they were decided: lease (this process's lease, no round trip), "
    "redis (one call to Redis), local (this process's counters: no REDIS_URL, or Redis unreachable).",
    ["path"],
    registry=_OWN,
)
rate_limited = Counter(
    "router_client_rate_limited",
    "Requests refused with 429 by a client key's limit: rpm, tpm, concurrency, daily_tokens, monthly_tokens.",
    ["client", "limit"],
    registry=_OWN,
)

# Label children, each made once by prometheus_client's locked `labels()` and then read from a
# plain dict. Written on the event loop thread; from another thread a racing first use makes
# the same child twice (labels() returns the one it keeps), so no count is lost.
_request_children: dict[tuple[str, str, int], Counter] = {}
_duration_children: dict[str, Histogram] = {}
_first_byte_children: dict[str, Histogram] = {}
_token_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}


def request_done(route: str, endpoint: str, status: int, seconds: float) -> None:
    """One finished request: route is a route label (a path of the route table or "other"),
    endpoint the name that served it ("" when none did), status its HTTP status (499: the client
    went away), seconds its whole duration."""
    key = (route, endpoint, status)
    counter = _request_children.get(key)
    if counter is None:
        counter = _request_children[key] = requests.labels(route, endpoint, str(status))
    counter.inc()
    hist = _duration_children.get(route)
    if hist is None:
        hist = _duration_children[route] = duration.labels(route)
    hist.observe(seconds)


_client_request_children: dict[tuple[str, int], Counter] = {}
_client_token_children: dict[str, tuple[Counter, Counter]] = {}


def client_request_done(client: str, status: int) -> None:
    """One finished request of an authenticated client (the principal's name)."""
    key = (client, status)
    counter = _client_request_children.get(key)
    if counter is None:
        counter = _client_request_children[key] = client_requests.labels(client, str(status))
    counter.inc()


def count_client_tokens(client: str, prompt: int, completion: int) -> None:
    """Tokens one finished request of `client` reported (prompt: input, completion: output)."""
    pair = _client_token_children.get(client)
    if pair is None:
        pair = _client_token_children[client] = (
            client_tokens.labels(client, "input"),
            client_tokens.labels(client, "output"),
        )
    pair[0].inc(prompt)
    pair[1].inc(completion)


def first_byte(route: str, seconds: float) -> None:
    """Time to the upstream's first byte of one attempt on `route`, in seconds."""
    hist = _first_byte_children.get(route)
    if hist is None:
        hist = _first_byte_children[route] = _first_byte.labels(route)
    hist.observe(seconds)


def queue_wait(seconds: float) -> None:
    """Time one slot took to get, in seconds (0 when one was free)."""
    _queue_wait.observe(seconds)


def count_tokens(endpoint: str, model: str, prompt: int, completion: int) -> None:
    """Tokens one finished request reported: endpoint url, model key, prompt (input) and
    completion (output) tokens."""
    pair = _token_children.get((endpoint, model))
    if pair is None:
        pair = _token_children[(endpoint, model)] = (
            tokens.labels(endpoint, model, "input"),
            tokens.labels(endpoint, model, "output"),
        )
    pair[0].inc(prompt)
    pair[1].inc(completion)


_LOCK_FAMILIES = (
    (CounterMetricFamily, "router_lock_wait_seconds", "Time spent waiting for each lock.", "wait_total"),
    (GaugeMetricFamily, "router_lock_wait_max_seconds", "Longest single wait for each lock.", "wait_max"),
    (CounterMetricFamily, "router_lock_acquisitions", "Acquisitions of each lock.", "acquisitions"),
    (
        CounterMetricFamily,
        "router_lock_timeouts",
        "Acquisitions that gave up (a deadlock guard).",
        "timeouts",
    ),
)


class LockCollector(Collector):
    """The lock monitoring of routing/observability/locks.py, read at scrape time: wait time,
    longest wait, acquisitions and timeouts of every TimedLock, by lock name."""

    def collect(self) -> Iterator[Metric]:
        locks = all_locks()
        for family_type, name, help_text, attr in _LOCK_FAMILIES:
            family = family_type(name, help_text, labels=["lock"])
            for lock in locks:
                family.add_metric([lock.name], getattr(lock, attr))
            yield family


ProcessCollector(registry=_OWN)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
_OWN.register(LockCollector())


class _WithInstance(Collector):
    """The families of `sources`, each sample given this process's `instance` label."""

    def __init__(self, sources: Iterable[Collector]) -> None:
        self._sources = tuple(sources)

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            for family in source.collect():
                family.samples = [
                    s._replace(labels={"instance": INSTANCE, **s.labels}) for s in family.samples
                ]
                yield family


def render(*collectors: Collector) -> bytes:
    """The exposition (UTF-8, format 0.0.4, served as CONTENT_TYPE): this process's instruments,
    its process_* and lock metrics, then `collectors` collected now (the /metrics view passes
    the fleet gauges of routing/status/gauges.py)."""
    return generate_latest(_WithInstance((_OWN, *collectors)))
