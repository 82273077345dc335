"""`make bench`: the router against direct-to-backend, side by side, in one run.

    .venv/bin/python -m bench.run                  # everything; writes docs/benchmarks.md
    .venv/bin/python -m bench.run --quick          # a short smoke run (not written to the docs)
    .venv/bin/python -m bench.run --servers daphne --only throughput,ttfb

What it starts (all on 127.0.0.1, all stopped at the end):
- fake backends (bench/fake_backend.py), each its own process: an Ollama one (NDJSON),
  an OpenAI-compatible one (SSE), and a slow Ollama one for the many-streams test;
- a scratch SQLite database with the three endpoints (limit 64, so the router's own
  per-endpoint limit is not what is measured; 1,100 for the slow one);
- the router under daphne (its default server) and, side by side, under uvicorn;
- wrk (bench/post.lua) for throughput and latency, small asyncio clients (bench/loadgen.py)
  for time to first byte and for 1,000 concurrent slow streams;
- for /api/stats: a scratch PostgreSQL database `nomyo_bench` with 1,000,000 minute rows.

The machine is shared and noisy, so every figure that matters is a ratio of the router to
the backend measured directly, in the same minute: each scenario runs direct, daphne and
uvicorn back to back, and the order is reversed in the next round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import affinity, fairness, loadgen, procs, report
from bench.procs import Proc

REPO = procs.REPO
DOC = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "bench" / "results"

OLLAMA_MODEL = "bench:latest"
OPENAI_MODEL = "bench-oa"
SLOW_MODEL = "slow:latest"
PROMPT = [{"role": "user", "content": "Say hello in a few words."}]


@dataclass(frozen=True)
class Scenario:
    protocol: str  # "ollama" (/api/chat on an ollama-kind fake) or "openai" (/v1/chat/completions)
    stream: bool
    concurrency: int

    @property
    def path(self) -> str:
        return "/api/chat" if self.protocol == "ollama" else "/v1/chat/completions"

    @property
    def body(self) -> str:
        model = "bench" if self.protocol == "ollama" else OPENAI_MODEL
        return json.dumps({"model": model, "stream": self.stream, "messages": PROMPT})

    @property
    def key(self) -> str:
        return f"{self.protocol}-{'stream' if self.stream else 'whole'}-c{self.concurrency}"

    @property
    def label(self) -> str:
        mode = "stream" if self.stream else "non-stream"
        return f"{self.path} {mode}, c={self.concurrency}"


@dataclass
class Options:
    servers: list[str]
    only: set[str]
    duration: float
    rounds: int
    tokens: int
    delay: float
    concurrency: list[int]
    ttfb_requests: int
    slow_streams: int
    slow_tokens: int
    slow_delay: float
    stats_rows: int
    stats_requests: int
    pg_url: str
    memory_streams: int
    memory_tokens: int
    memory_pad: int
    memory_max_body_mb: int
    memory_read_bytes: int
    memory_interval: float
    memory_duration: float
    memory_bodies: int
    memory_body_mb: int
    write_doc: bool
    doc: Path
    command: str
    warmup: float = 1.0
    notes: list[str] = field(default_factory=list)


PHASES = ("throughput", "ttfb", "slow", "memory", "stats", "fairness", "affinity")
BIG_MODEL = "big:latest"


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="daphne,uvicorn", help="routers to measure (daphne first)")
    p.add_argument("--only", default=",".join(PHASES), help=f"phases to run, of {', '.join(PHASES)}")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every throughput scenario")
    p.add_argument("--tokens", type=int, default=32, help="tokens per reply of the fast fakes")
    p.add_argument("--delay", type=float, default=0.0, help="seconds per token of the fast fakes")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--ttfb-requests", type=int, default=500)
    p.add_argument("--slow-streams", type=int, default=1000)
    p.add_argument("--slow-tokens", type=int, default=40)
    p.add_argument("--slow-delay", type=float, default=0.05)
    p.add_argument("--stats-rows", type=int, default=1_000_000)
    p.add_argument("--stats-requests", type=int, default=50)
    p.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432", help="server, no database")
    p.add_argument("--memory-streams", type=int, default=100, help="slow readers of one large stream each")
    p.add_argument("--memory-tokens", type=int, default=2_600, help="tokens of that stream")
    p.add_argument(
        "--memory-pad", type=int, default=2_000, help="filler bytes per token (2,600 x ~2.1 kB: 5.5 MB)"
    )
    p.add_argument(
        "--memory-max-body-mb", type=int, default=16, help="ROUTER_MAX_BODY (MiB) of the routers in this run"
    )
    p.add_argument("--memory-read-bytes", type=int, default=1024, help="what a slow reader reads at a time")
    p.add_argument("--memory-interval", type=float, default=0.5, help="seconds between its reads")
    p.add_argument("--memory-duration", type=float, default=20.0, help="seconds the slow readers read")
    p.add_argument("--memory-bodies", type=int, default=3, help="concurrent oversized request bodies")
    p.add_argument("--memory-body-mb", type=int, default=400, help="size of each, in MiB")
    p.add_argument("--quick", action="store_true", help="short smoke run; does not write the docs")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--doc", type=Path, default=DOC)
    args = p.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in ("daphne", "uvicorn"):
            p.error(f"unknown server {s!r}")
    opts = Options(
        servers=servers,
        only=only,
        duration=args.duration,
        rounds=args.rounds,
        tokens=args.tokens,
        delay=args.delay,
        concurrency=[int(c) for c in args.concurrency.split(",")],
        ttfb_requests=args.ttfb_requests,
        slow_streams=args.slow_streams,
        slow_tokens=args.slow_tokens,
        slow_delay=args.slow_delay,
        stats_rows=args.stats_rows,
        stats_requests=args.stats_requests,
        pg_url=args.pg_url.rstrip("/"),
        memory_streams=args.memory_streams,
        memory_tokens=args.memory_tokens,
        memory_pad=args.memory_pad,
        memory_max_body_mb=args.memory_max_body_mb,
        memory_read_bytes=args.memory_read_bytes,
        memory_interval=args.memory_interval,
        memory_duration=args.memory_duration,
        memory_bodies=args.memory_bodies,
        memory_body_mb=args.memory_body_mb,
        write_doc=not (args.no_doc or args.quick),
        doc=args.doc,
        command=" ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
    )
    if args.quick:
        opts.duration, opts.rounds, opts.ttfb_requests = 2.0, 1, 100
        opts.slow_streams, opts.stats_rows, opts.stats_requests = 200, 100_000, 10
        opts.memory_duration = 8.0
        opts.warmup = 1.0
    return opts


def start_fast_fakes(*, tokens: int, delay: float, log_dir: Path) -> dict[str, procs.Proc]:
    """The two fast fake backends every throughput comparison uses: Ollama and OpenAI kinds."""
    return {
        kind: procs.start_fake(
            f"fake-{kind}",
            kind=kind,
            models=[OLLAMA_MODEL if kind == "ollama" else OPENAI_MODEL],
            tokens=tokens,
            delay=delay,
            log_dir=log_dir,
        )
        for kind in ("ollama", "openai")
    }


def fast_fake_endpoints(fakes: dict[str, procs.Proc]) -> list[dict[str, Any]]:
    """Their endpoint rows; a limit of 64 so the router's own queue never holds a request."""
    return [
        {"name": "fake-ollama", "url": fakes["ollama"].url, "kind": "ollama", "limit": 64},
        {"name": "fake-openai", "url": fakes["openai"].url + "/v1", "kind": "openai", "limit": 64},
    ]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- preparation ---------------------------------------------------------------------
def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("wrk is missing: apt-get install -y wrk")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, check=False).returncode == 0
        if not ok:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, check=False)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed; install it with: sudo apt-get install -y wrk")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as fh:
            mem_kb = int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "commit": commit or "-",
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": loadgen.wrk_version(),
        "versions": {d: _version(d) for d in ("Django", "daphne", "Twisted", "uvicorn", "httpx", "aiohttp")},
    }


def fetch_json(url: str, data: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def check_reply(target: str, url: str, sc: Scenario, tokens: int) -> None:
    """One request before measuring: 200 and the whole reply, so wrk measures real work."""
    req = urllib.request.Request(url, data=sc.body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{target} {sc.label}: HTTP {resp.status}")
    last = f"tok{tokens - 1} ".encode()
    if tokens and last not in body:
        raise RuntimeError(f"{target} {sc.label}: reply lacks {last!r}: {body[:300]!r}")


# -- phases --------------------------------------------------------------------------
class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        self.log_dir = REPO / "var" / "bench" / stamp
        self.started: list[Proc] = []
        self.routers: dict[str, Proc] = {}
        self.fakes: dict[str, Proc] = {}
        self.results: dict[str, Any] = {
            "meta": {},
            "options": {k: (sorted(v) if isinstance(v, set) else v) for k, v in asdict(opts).items()},
            "throughput": [],
            "ttfb": [],
            "first_request": {},
            "slow": [],
            "memory": {"readers": [], "bodies": []},
            "stats": {},
        }
        self.results["options"]["doc"] = (
            str(opts.doc.relative_to(REPO)) if opts.doc.is_relative_to(REPO) else ""
        )

    # -- processes ---------------------------------------------------------------------
    def _track(self, proc: Proc) -> Proc:
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()

    def start_backends(self) -> None:
        o = self.opts
        log(
            f"fake backends: {o.tokens} tokens/reply, {o.delay:g} s/token; "
            f"slow: {o.slow_tokens} x {o.slow_delay:g} s"
        )
        for kind, fake in start_fast_fakes(tokens=o.tokens, delay=o.delay, log_dir=self.log_dir).items():
            self.fakes[kind] = self._track(fake)
        if "memory" in o.only:
            self.fakes["big"] = self._track(
                procs.start_fake(
                    "fake-big",
                    kind="ollama",
                    models=[BIG_MODEL],
                    tokens=o.memory_tokens,
                    delay=0.0,
                    log_dir=self.log_dir,
                    pad=o.memory_pad,
                )
            )
        if "slow" in o.only:
            self.fakes["slow"] = self._track(
                procs.start_fake(
                    "fake-slow",
                    kind="ollama",
                    models=[SLOW_MODEL],
                    tokens=o.slow_tokens,
                    delay=o.slow_delay,
                    log_dir=self.log_dir,
                )
            )

    def prepare_sqlite(self) -> str:
        db = self.log_dir / "router.sqlite3"
        url = f"sqlite:///{db}"
        procs.manage("migrate", "--noinput", "-v", "0", database_url=url)
        spec = fast_fake_endpoints(self.fakes)
        if "slow" in self.fakes:
            limit = max(64, self.opts.slow_streams + 100)
            spec.append(
                {"name": "fake-slow", "url": self.fakes["slow"].url, "kind": "ollama", "limit": limit}
            )
        if "big" in self.fakes:
            limit = self.opts.memory_streams + 100
            spec.append({"name": "fake-big", "url": self.fakes["big"].url, "kind": "ollama", "limit": limit})
        procs.dbtool("endpoints", json.dumps(spec), database_url=url)
        return url

    def start_routers(self, database_url: str) -> None:
        for server in self.opts.servers:
            log(f"router under {server}")
            router = self._track(procs.start_router(server, database_url=database_url, log_dir=self.log_dir))
            self.routers[server] = router
            # The first routed request after start-up: pre-warm should make it ordinary.
            sc = Scenario("ollama", True, 1)
            first = asyncio.run(loadgen.ttfb(router.url + sc.path, sc.body.encode(), n=1, warmup=0))
            self.results["first_request"][server] = first.total_ms[0] if first.total_ms else None

    def targets(self, protocol: str) -> dict[str, str]:
        """Base URL of each target: the fake itself ("direct") and each router."""
        return {"direct": self.fakes[protocol].url, **{s: r.url for s, r in self.routers.items()}}

    # -- throughput ----------------------------------------------------------------------
    def scenarios(self) -> list[Scenario]:
        return [
            Scenario(protocol, stream, c)
            for protocol in ("ollama", "openai")
            for stream in (True, False)
            for c in self.opts.concurrency
        ]

    def phase_throughput(self) -> None:
        o = self.opts
        scenarios = self.scenarios()
        for protocol in ("ollama", "openai"):
            for stream in (True, False):
                sc = Scenario(protocol, stream, max(o.concurrency))
                for target, base in self.targets(protocol).items():
                    check_reply(target, base + sc.path, sc, o.tokens)
                    loadgen.run_wrk(base + sc.path, sc.body, connections=sc.concurrency, duration=o.warmup)
        log(
            f"throughput: {len(scenarios)} scenarios x {1 + len(self.routers)} targets"
            f" x {o.rounds} rounds x {o.duration:g} s"
        )
        for rnd in range(o.rounds):
            for sc in scenarios:
                order = list(self.targets(sc.protocol).items())
                if rnd % 2:
                    order.reverse()
                line = []
                for target, base in order:
                    router = self.routers.get(target)
                    cpu0 = router.cpu_seconds() if router else 0.0
                    fake = self.fakes[sc.protocol]
                    fake_cpu0 = fake.cpu_seconds()
                    res = loadgen.run_wrk(
                        base + sc.path, sc.body, connections=sc.concurrency, duration=o.duration
                    )
                    row: dict[str, Any] = {
                        "scenario": sc.key,
                        "protocol": sc.protocol,
                        "stream": sc.stream,
                        "concurrency": sc.concurrency,
                        "target": target,
                        "round": rnd,
                        **res.as_dict(),
                    }
                    if router is not None and res.requests:
                        row["router_cpu_ms_per_req"] = (router.cpu_seconds() - cpu0) * 1000 / res.requests
                    if res.requests:
                        row["backend_cpu_ms_per_req"] = (fake.cpu_seconds() - fake_cpu0) * 1000 / res.requests
                    self.results["throughput"].append(row)
                    line.append(f"{target} {res.rps:7.0f}/s p50 {res.p50_ms:6.2f} p99 {res.p99_ms:6.2f}")
                    if res.failures:
                        line.append(f"FAILURES {res.failures}")
                log(f"r{rnd} {sc.label:42s} " + " | ".join(line))

    # -- time to first byte -------------------------------------------------------------
    def phase_ttfb(self) -> None:
        o = self.opts
        log(f"time to first byte: {o.ttfb_requests} sequential streamed requests per target")
        for protocol in ("ollama", "openai"):
            sc = Scenario(protocol, True, 1)
            targets = list(self.targets(protocol).items())
            for rnd in range(2):  # two half-runs, the second in reverse order
                for target, base in targets if rnd == 0 else reversed(targets):
                    res = asyncio.run(
                        loadgen.ttfb(base + sc.path, sc.body.encode(), n=o.ttfb_requests // 2, warmup=10)
                    )
                    self.results["ttfb"].append(
                        {"protocol": protocol, "target": target, "round": rnd, **asdict(res)}
                    )
            for target in dict(targets):
                rows = [
                    r for r in self.results["ttfb"] if r["protocol"] == protocol and r["target"] == target
                ]
                firsts = [v for r in rows for v in r["ttfb_ms"]]
                log(
                    f"ttfb {sc.path:22s} {target:8s} p50 {loadgen.percentile(firsts, 50):6.2f} ms"
                    f" p99 {loadgen.percentile(firsts, 99):6.2f} ms errors {sum(r['errors'] for r in rows)}"
                )

    # -- many slow streams --------------------------------------------------------------
    def phase_slow(self) -> None:
        o = self.opts
        fake = self.fakes["slow"]
        body = json.dumps({"model": "slow", "stream": True, "messages": PROMPT}).encode()
        ideal = o.slow_tokens * o.slow_delay
        log(
            f"slow streams: {o.slow_streams} concurrent, "
            f"{o.slow_tokens} tokens every {o.slow_delay * 1000:g} ms"
        )
        for target, base in {"direct": fake.url, **{s: r.url for s, r in self.routers.items()}}.items():
            router = self.routers.get(target)
            fetch_json(fake.url + "/_fake/reset", b"{}")
            rss_before = router.status_kb("VmRSS") if router else 0
            sampler = procs.RssSampler(router) if router else None
            if sampler:
                sampler.__enter__()
            try:
                res = asyncio.run(
                    loadgen.slow_streams(
                        base + "/api/chat",
                        body,
                        streams=o.slow_streams,
                        ramp_s=1.0,
                        timeout=ideal * 10 + 30,
                        done_marker=b'"done":true',
                        chunks_per_stream=o.slow_tokens + 1,
                    )
                )
            finally:
                if sampler:
                    sampler.__exit__()
            stats = fetch_json(fake.url + "/_fake/stats")
            row: dict[str, Any] = {
                "target": target,
                "ideal_s": ideal,
                **asdict(res),
                "backend_max_in_flight": max(stats["max_in_flight"].values(), default=0),
                "backend_completed": stats["completed"],
            }
            if router and sampler:
                row.update(
                    rss_before_mb=rss_before / 1024,
                    rss_peak_mb=sampler.peak_kb / 1024,
                    rss_after_mb=router.status_kb("VmRSS") / 1024,
                    hwm_mb=router.status_kb("VmHWM") / 1024,
                    rss_samples=sampler.samples,
                )
            self.results["slow"].append(row)
            mem = f" RSS peak {row['rss_peak_mb']:.0f} MB" if router else ""
            log(
                f"slow {target:8s} ok {res.ok}/{res.streams} open at once {res.open_at_once}"
                f" (backend {row['backend_max_in_flight']}) {res.chunks_per_s:.0f} chunks/s"
                f" duration p50 {res.duration_p50_s:.2f} s p99 {res.duration_p99_s:.2f} s{mem}"
                + (f" errors: {res.error_samples}" if res.errors else "")
            )
            time.sleep(1.0)  # let the closed connections drain before the next target

    # -- memory bounded by settings, not by clients ---------------------------------------
    def phase_memory(self) -> None:
        """Oversized bodies (the body limit), then slow readers of a large stream (backpressure);
        in that order, so each body's cost shows on a router that has not grown yet."""
        o = self.opts
        fake = self.fakes["big"]
        body = json.dumps({"model": "big", "stream": True, "messages": PROMPT}).encode()
        with urllib.request.urlopen(
            urllib.request.Request(fake.url + "/api/chat", data=body), timeout=60
        ) as resp:
            reply_bytes = len(resp.read())
        mem = self.results["memory"]
        mem["reply_bytes"] = reply_bytes
        size = o.memory_body_mb << 20
        log(f"memory: {o.memory_bodies} concurrent {o.memory_body_mb} MiB bodies (Content-Length, chunked)")
        for server, router in self.routers.items():
            for chunked in (False, True):
                rss_before = router.status_kb("VmRSS")
                with procs.RssSampler(router) as sampler:
                    outcomes = asyncio.run(
                        loadgen.big_bodies(
                            router.url + "/api/chat",
                            bodies=o.memory_bodies,
                            size=size,
                            chunked=chunked,
                            timeout=120,
                        )
                    )
                row: dict[str, Any] = {
                    "target": server,
                    "framing": "chunked" if chunked else "Content-Length",
                    "bodies": o.memory_bodies,
                    "body_bytes": size,
                    "max_body": _router_max_body(),
                    "statuses": [b.status for b in outcomes],
                    "sent_mb": [round(b.sent / (1 << 20), 1) for b in outcomes],
                    "cut": sum(b.cut for b in outcomes),
                    "rss_before_mb": rss_before / 1024,
                    "rss_peak_mb": sampler.peak_kb / 1024,
                    "rss_after_mb": router.status_kb("VmRSS") / 1024,
                }
                mem["bodies"].append(row)
                log(
                    f"memory {server:8s} {row['framing']:14s} statuses {row['statuses']}"
                    f" sent MiB {row['sent_mb']}"
                    f" RSS {row['rss_before_mb']:.0f} -> peak {row['rss_peak_mb']:.0f} MB"
                )
        log(
            f"memory: {o.memory_streams} clients reading a {reply_bytes / 1e6:.1f} MB stream, "
            f"{o.memory_read_bytes} B every {o.memory_interval:g} s for {o.memory_duration:g} s"
        )
        for server, router in self.routers.items():
            fetch_json(fake.url + "/_fake/reset", b"{}")
            rss_before = router.status_kb("VmRSS")
            with procs.RssSampler(router) as sampler:
                res = asyncio.run(
                    loadgen.slow_readers(
                        router.url + "/api/chat",
                        body,
                        streams=o.memory_streams,
                        read_bytes=o.memory_read_bytes,
                        interval=o.memory_interval,
                        duration=o.memory_duration,
                    )
                )
                released = _wait_slots_released(router.url, timeout=30)
            stats = fetch_json(fake.url + "/_fake/stats")
            row = {
                "target": server,
                **asdict(res),
                "backend_bytes": stats["bytes_streamed"],
                "backend_completed": stats["completed"],
                "backend_cancelled": stats["cancelled"],
                "slots_released": released,
                "rss_before_mb": rss_before / 1024,
                "rss_peak_mb": sampler.peak_kb / 1024,
                "rss_after_mb": router.status_kb("VmRSS") / 1024,
            }
            mem["readers"].append(row)
            log(
                f"memory {server:8s} readers {res.started}/{res.streams} read {res.bytes_read / 1e6:.1f} MB,"
                f" backend wrote {row['backend_bytes'] / 1e6:.1f} MB"
                f" of {o.memory_streams * reply_bytes / 1e6:.0f},"
                f" RSS {row['rss_before_mb']:.0f} -> peak {row['rss_peak_mb']:.0f} MB,"
                f" slots released: {released}" + (f" errors: {res.error_samples}" if res.errors else "")
            )

    # -- /api/stats on PostgreSQL --------------------------------------------------------
    def phase_stats(self) -> None:
        o = self.opts
        out: dict[str, Any] = {}
        self.results["stats"] = out
        if "api/stats" not in (REPO / "routing" / "proxy_urls.py").read_text():
            out["skipped"] = "the /api/stats route does not exist yet"
            log("stats: skipped (" + out["skipped"] + ")")
            return
        try:
            import psycopg
        except ImportError:
            out["skipped"] = "psycopg is not installed"
            return
        try:
            with psycopg.connect(o.pg_url + "/postgres", autocommit=True, connect_timeout=3) as conn:
                conn.execute("DROP DATABASE IF EXISTS nomyo_bench WITH (FORCE)")
                conn.execute("CREATE DATABASE nomyo_bench")
        except psycopg.Error as exc:
            out["skipped"] = f"PostgreSQL not reachable at {o.pg_url}: {exc}".strip()
            log("stats: skipped (" + out["skipped"] + ")")
            return
        url = o.pg_url + "/nomyo_bench"
        log(f"stats: migrate nomyo_bench, COPY {o.stats_rows:,} rows")
        procs.manage("migrate", "--noinput", "-v", "0", database_url=url)
        fill = json.loads(procs.dbtool("fill-series", "--rows", str(o.stats_rows), database_url=url))
        out["fill"] = fill
        log(
            f"stats: {fill['rows']:,} rows {fill['first'][:10]} .. {fill['last'][:10]}, "
            f"copy {fill['copy_s']} s"
        )
        model = fill["models"][0]
        end = datetime.fromisoformat(fill["last"]) + timedelta(minutes=1)
        start = end - timedelta(days=7)
        body = json.dumps({"model": model, "from": start.isoformat(), "to": end.isoformat()})
        out["request"] = json.loads(body)
        for server in self.opts.servers[:1]:
            router = self._track(
                procs.start_router(server, database_url=url, log_dir=self.log_dir, name=f"router-{server}-pg")
            )
            answer = fetch_json(router.url + "/api/stats", body.encode())
            out["answer"] = {
                "points": len(answer.get("time_series", [])),
                "bucket": answer.get("bucket"),
                "range_total_tokens": answer.get("range_totals", {}).get("total_tokens"),
            }
            seq = asyncio.run(
                loadgen.sequential_posts(
                    router.url + "/api/stats", body.encode(), n=o.stats_requests, warmup=3
                )
            )
            out["sequential"] = {"server": server, **seq.summary()}
            res = loadgen.run_wrk(router.url + "/api/stats", body, connections=8, duration=o.duration)
            out["concurrent"] = {"server": server, "connections": 8, **res.as_dict()}
            router.stop()
            log(
                f"stats via {server}: c=1 p50 {seq.summary()['total_p50_ms']:.1f} ms"
                f" p99 {seq.summary()['total_p99_ms']:.1f} ms; c=8 {res.rps:.1f}/s p50 {res.p50_ms:.1f} ms"
                f" failures {res.failures + seq.errors}"
            )
        explain = json.loads(
            procs.dbtool(
                "stats-explain",
                "--model",
                model,
                "--from",
                start.isoformat(),
                "--to",
                end.isoformat(),
                database_url=url,
            )
        )
        out["explain"] = explain
        log(f"stats: main query in process p50 {explain['in_process_ms_p50']:.1f} ms")

    # -- the run -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.opts
        meta = self.results["meta"]
        meta.update(machine())
        meta["date"] = datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
        meta["loadavg_start"] = os.getloadavg()
        started = time.monotonic()
        log(f"logs in {self.log_dir.relative_to(REPO)}")
        try:
            needs_routing = o.only & {"throughput", "ttfb", "slow", "memory"}
            if "memory" in o.only:
                # The routers of this run refuse bodies over this (their other requests are small).
                os.environ["ROUTER_MAX_BODY"] = str(o.memory_max_body_mb << 20)
            if needs_routing:
                self.start_backends()
                self.start_routers(self.prepare_sqlite())
            if "throughput" in o.only:
                self.phase_throughput()
            if "ttfb" in o.only:
                self.phase_ttfb()
            if "slow" in o.only:
                self.phase_slow()
            if "memory" in o.only:
                self.phase_memory()
            for server, router in self.routers.items():
                meta.setdefault("router_hwm_mb", {})[server] = router.status_kb("VmHWM") / 1024
                if not router.alive():
                    raise RuntimeError(f"router {server} died:\n{router.log_tail()}")
            self.stop_all()
            if "stats" in o.only:
                self.phase_stats()
            if "fairness" in o.only:
                log("fairness: one key floods a model's queue, another sends one request at a time")
                self.results["fairness"] = fairness.run(self.log_dir, server=o.servers[0])
            if "affinity" in o.only:
                log(
                    "affinity: 50 conversations x 10 turns over 3 servers, prompt-cache affinity off, then on"
                )
                options = affinity.parse_args(["--server", o.servers[0], "--no-doc"])
                self.results["affinity"] = affinity.run(self.log_dir, options)
        finally:
            self.stop_all()
        meta["loadavg_end"] = os.getloadavg()
        meta["wall_s"] = round(time.monotonic() - started, 1)
        return self.results


def _wait_slots_released(base: str, timeout: float) -> bool:
    """Until the router's /metrics shows no slot held (True), or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        held = [
            line
            for line in text.splitlines()
            if line.startswith("router_in_flight{") and float(line.rsplit(" ", 1)[1]) != 0
        ]
        if not held:
            return True
        time.sleep(0.2)
    return False


def _router_max_body() -> int:
    """ROUTER_MAX_BODY as the bench's routers see it (the environment, else the default)."""
    return int(os.environ.get("ROUTER_MAX_BODY", 64 * 1024 * 1024))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    ensure_wrk()
    raise_fd_limit()
    bench = Bench(opts)
    results = bench.run()
    results["targets"] = report.evaluate(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path = RESULTS / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    text = report.markdown(results)
    print()
    print(report.summary_text(results))
    log(f"results: {json_path.relative_to(REPO)}")
    if opts.write_doc and opts.only <= {"fairness", "affinity"}:  # those sections alone, spliced in
        doc = opts.doc.read_text()
        for section in (fairness.section(results), affinity.section(results)):
            doc = report.splice_section(doc, section)
        opts.doc.write_text(doc)
    elif opts.write_doc:
        opts.doc.write_text(text)
        log(f"wrote {opts.doc.relative_to(REPO) if opts.doc.is_relative_to(REPO) else opts.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
