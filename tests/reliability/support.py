"""Helpers of the reliability suite: a strict /metrics parser, raw-socket clients, totals.

The router runs as a separate process (tests/conftest.py `router`), so everything here
looks at it from the outside: its /metrics text, its database rows, its log, and the
fake backends' own counters.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from bench.fake_backend import ThreadedFake
from tests.conftest import RouterProcess, wait_until

MODEL = "llama3"
MODEL_KEY = "llama3:latest"
PROMPT = "why is the sky blue"  # 5 words: the fake reports 6 prompt tokens
PROMPT_TOKENS = 6
MESSAGES = [{"role": "user", "content": PROMPT}]


# --------------------------------------------------------------------------- /metrics


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|Inf|NaN)"
SAMPLE_LINE = re.compile(
    rf"^(?P<name>{_NAME})(?:\{{(?P<labels>(?:{_LABEL})(?:,{_LABEL})*)?\}})? (?P<value>{_VALUE})$"
)
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
HELP_LINE = re.compile(rf"^# HELP (?P<name>{_NAME}) \S.*$")
TYPE_LINE = re.compile(rf"^# TYPE (?P<name>{_NAME}) (?P<type>counter|gauge|histogram|summary|untyped)$")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Metrics:
    samples: list[Sample]
    types: dict[str, str] = field(default_factory=dict)

    def find(self, name: str, **labels: str) -> list[Sample]:
        return [
            s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of every series of `name` whose labels include `labels` (0 when none)."""
        return sum(s.value for s in self.find(name, **labels))

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.find(name, **labels))


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def _family(name: str, types: dict[str, str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return base
    return name


def parse_metrics(text: str) -> Metrics:
    """Parse the Prometheus text exposition format strictly; AssertionError on any bad line.

    Checked: every line is a HELP, TYPE or sample line; each family has one HELP and one
    TYPE, given before its samples; no series appears twice; counters are >= 0;
    histogram buckets are cumulative and `+Inf` equals `_count`.
    """
    assert text.endswith("\n"), "the exposition must end with a newline"
    helps: set[str] = set()
    types: dict[str, str] = {}
    samples: list[Sample] = []
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        if line.startswith("#"):
            if m := HELP_LINE.match(line):
                assert m["name"] not in helps, f"line {number}: second HELP for {m['name']}"
                helps.add(m["name"])
            elif m := TYPE_LINE.match(line):
                assert m["name"] not in types, f"line {number}: second TYPE for {m['name']}"
                types[m["name"]] = m["type"]
            else:
                raise AssertionError(f"line {number}: malformed comment {line!r}")
            continue
        m = SAMPLE_LINE.match(line)
        assert m is not None, f"line {number}: malformed sample {line!r}"
        pairs = LABEL_PAIR.findall(m["labels"] or "")
        names = [k for k, _ in pairs]
        assert len(names) == len(set(names)), f"line {number}: repeated label in {line!r}"
        labels = {k: _unescape(v) for k, v in pairs}
        family = _family(m["name"], types)
        assert family in types and family in helps, f"line {number}: sample before HELP/TYPE: {line!r}"
        key = (m["name"], tuple(sorted(labels.items())))
        assert key not in seen, f"line {number}: series repeated: {line!r}"
        seen.add(key)
        raw = m["value"]
        value = math.inf if raw.lstrip("+") == "Inf" else -math.inf if raw == "-Inf" else float(raw)
        if types[family] in ("counter", "histogram"):
            assert value >= 0, f"line {number}: negative {types[family]} value: {line!r}"
        samples.append(Sample(m["name"], labels, value))
    metrics = Metrics(samples, types)
    _check_histograms(metrics)
    return metrics


def _check_histograms(metrics: Metrics) -> None:
    for family, kind in metrics.types.items():
        if kind != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for s in metrics.find(family + "_bucket"):
            rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            bound = math.inf if s.labels["le"] == "+Inf" else float(s.labels["le"])
            series.setdefault(rest, []).append((bound, s.value))
        for rest, buckets in series.items():
            buckets.sort()
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{family}{dict(rest)}: buckets are not cumulative"
            assert buckets[-1][0] == math.inf, f"{family}{dict(rest)}: no +Inf bucket"
            total = metrics.value(family + "_count", **dict(rest))
            assert buckets[-1][1] == total, f"{family}{dict(rest)}: +Inf bucket != _count"
            assert metrics.has(family + "_sum", **dict(rest)), f"{family}{dict(rest)}: no _sum"


def metrics_of(router: RouterProcess) -> Metrics:
    response = httpx.get(router.url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


def in_flight(router: RouterProcess) -> dict[tuple[str, str], float]:
    """Slots held right now, {(endpoint name, model): count}, as /metrics reports them."""
    found = metrics_of(router).find("router_in_flight")
    return {(s.labels["endpoint"], s.labels["model"]): s.value for s in found if s.value}


def queued(router: RouterProcess) -> dict[str, float]:
    return {s.labels["model"]: s.value for s in metrics_of(router).find("router_queued") if s.value}


def endpoint_up(router: RouterProcess, name: str) -> float | None:
    found = metrics_of(router).find("router_endpoint_up", endpoint=name)
    return found[0].value if found else None


def usage_counts(router: RouterProcess) -> dict[str, dict[str, int]] | None:
    """GET /api/usage's active requests {url: {model: n}}, or None where the route is missing."""
    response = httpx.get(router.url + "/api/usage", timeout=10)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    counts: dict[str, dict[str, int]] = response.json()["usage_counts"]
    assert all(n >= 0 for models in counts.values() for n in models.values()), counts
    return counts


def wait_idle(router: RouterProcess, timeout: float = 10.0) -> None:
    """Until no slot is held and nothing is queued (every slot returned to exactly zero),
    as /metrics and /api/usage both tell."""

    def idle() -> bool:
        usage = usage_counts(router)
        busy = usage is not None and any(n for models in usage.values() for n in models.values())
        return not busy and not in_flight(router) and not queued(router)

    wait_until(idle, timeout=timeout)


def wait_up(router: RouterProcess, name: str, up: bool, timeout: float = 10.0) -> None:
    wait_until(lambda: endpoint_up(router, name) == (1 if up else 0), timeout=timeout, interval=0.1)


# --------------------------------------------------------------------------- database


@dataclass(frozen=True)
class Totals:
    input: int = 0
    output: int = 0
    requests: int = 0
    incomplete: int = 0


def db_totals(endpoint_url: str | None = None) -> Totals:
    """What the router has flushed to the TokenTotal table (all endpoints, or one)."""
    from django.db.models import Sum

    from stats.models import TokenTotal

    rows = TokenTotal.objects.all()
    if endpoint_url is not None:
        rows = rows.filter(endpoint=endpoint_url)
    sums = rows.aggregate(
        i=Sum("input_tokens"), o=Sum("output_tokens"), r=Sum("requests"), n=Sum("incomplete")
    )
    return Totals(sums["i"] or 0, sums["o"] or 0, sums["r"] or 0, sums["n"] or 0)


def wait_db_totals(
    expected: Totals, endpoint_url: str | None = None, timeout: float = 10.0, *, settle: bool = True
) -> None:
    """Until the flushed totals equal `expected`; fails showing the last value. With
    `settle`, they must still be equal two flush intervals later (no double counting)."""
    deadline = time.monotonic() + timeout
    got = db_totals(endpoint_url)
    while got != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"token totals {got} never became {expected}")
        time.sleep(0.1)
        got = db_totals(endpoint_url)
    if settle:
        time.sleep(1.2)  # two more flush intervals (0.5 s in tests): nothing may arrive on top
        assert db_totals(endpoint_url) == expected


def fake_totals(*fakes: ThreadedFake) -> tuple[int, int]:
    """(prompt, completion) tokens the fakes put into replies the router received."""
    return (
        sum(f.stats.prompt_tokens_reported for f in fakes),
        sum(f.stats.completion_tokens_reported for f in fakes),
    )


# --------------------------------------------------------------------------- raw sockets


class RawRequest:
    """One HTTP/1.1 request over a plain socket, so a test decides exactly when to hang up."""

    def __init__(
        self,
        router: RouterProcess,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        declared_length: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", router.port), timeout=15)
        length = len(body) if declared_length is None else declared_length
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        head.append(f"Content-Length: {length}")
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            head.append("Content-Type: application/json")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.received = b""

    @classmethod
    def post_json(cls, router: RouterProcess, path: str, data: Any) -> RawRequest:
        return cls(router, "POST", path, json.dumps(data).encode())

    def read_until(self, marker: bytes, count: int = 1) -> bytes:
        """Read until `marker` was received `count` times (the response so far)."""
        while self.received.count(marker) < count:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed before {marker!r}: {self.received[-500:]!r}")
            self.received += data
        return self.received

    def read_to_end(self) -> bytes:
        while data := self.sock.recv(65536):
            self.received += data
        return self.received

    def status(self) -> int:
        self.read_until(b"\r\n\r\n")
        return int(self.received.split(b" ", 2)[1])

    def header(self, name: str) -> str | None:
        head = self.read_until(b"\r\n\r\n").split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- fakes


def slow_route(fake: ThreadedFake, method: str, path: str, delay: float) -> None:
    """Make one of the fake's routes answer `delay` seconds late (e.g. /api/tags).

    The fake looks its handlers up per request, so replacing the entry takes effect at once.
    """
    routes = fake.backend._routes[fake.config.kind]
    inner = routes[(method, path)]

    async def slower(request: web.BaseRequest, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return await inner(request, body)

    routes[(method, path)] = slower


def chat_body(*, stream: bool, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": stream, **extra}


def run_async(make: Callable[[], Awaitable[Any]], *, watchdog: float) -> Any:
    """Run a coroutine under a watchdog: a hang fails the test instead of hanging CI."""

    async def guarded() -> Any:
        async with asyncio.timeout(watchdog):
            return await make()

    return asyncio.run(guarded())


@dataclass
class Scrapes:
    metrics: list[Metrics] = field(default_factory=list)
    usage: list[dict[str, dict[str, int]]] = field(default_factory=list)  # /api/usage's usage_counts


@contextmanager
def sampling(router: RouterProcess, interval: float = 0.02) -> Iterator[Scrapes]:
    """Scrape /metrics and /api/usage in a background thread while the block runs."""
    import threading

    scrapes = Scrapes()
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                scrapes.metrics.append(parse_metrics(client.get(router.url + "/metrics").text))
                usage = client.get(router.url + "/api/usage")
                if usage.status_code == 200:
                    scrapes.usage.append(usage.json()["usage_counts"])
                stop.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield scrapes
    finally:
        stop.set()
        thread.join(15)


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Reply:
    endpoint: str
    request_id: str


async def chat(client: aiohttp.ClientSession, protocol: str, *, stream: bool, tokens: int) -> Reply:
    """One chat request through the router, checked to be complete in its protocol's shape.

    `tokens` is the fake's completion length; the prompt is PROMPT (6 prompt tokens).
    """
    path = "/api/chat" if protocol == "ollama" else "/v1/chat/completions"
    async with client.post(path, json=chat_body(stream=stream)) as response:
        raw = await response.read()
    assert response.status == 200, (path, response.status, raw[:300])
    text = raw.decode()
    if protocol == "ollama" and stream:
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert len(lines) == tokens + 1 and lines[-1]["done"] is True, text[-300:]
        assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (PROMPT_TOKENS, tokens)
    elif protocol == "ollama":
        reply = json.loads(text)
        assert (reply["prompt_eval_count"], reply["eval_count"]) == (PROMPT_TOKENS, tokens)
    elif stream:
        events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]", text[-300:]
        chunks = [json.loads(e) for e in events[:-1]]
        # the client did not ask for usage: the router asked for it and removed it again
        assert all(c["choices"] for c in chunks), text[-300:]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).split() == [
            f"tok{i}" for i in range(tokens)
        ]
    else:
        usage = json.loads(text)["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, tokens)
    return Reply(response.headers["X-Router-Endpoint"], response.headers["X-Request-Id"])


def async_client(router: RouterProcess, timeout: float = 30.0) -> aiohttp.ClientSession:
    """An aiohttp session on the router (a few times cheaper per request than httpx here,
    which matters: the client shares two cores with the router and the fakes)."""
    return aiohttp.ClientSession(
        base_url=router.url,
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )
