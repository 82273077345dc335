"""A/B of a router change: two routers side by side, the same fakes, interleaved wrk runs.

    .venv/bin/python -m bench.ab                      # the working tree (B) against HEAD (A)
    .venv/bin/python -m bench.ab --a /path/to/other/checkout --server uvicorn
    .venv/bin/python -m bench.ab --c1                 # the concurrency-1 scenarios
    .venv/bin/python -m bench.ab --key [--redis URL]  # A: the operator key, B: a client key (this tree)
    .venv/bin/python -m bench.ab --key --a-client-key --a OLD --redis URL  # OLD vs this tree, one key

With --key, A and B are one router of this tree (two routers when --a is given) with one router
key and one client key whose every limit is set (high enough never to refuse): A's requests
carry the router key (no key lookup, no limits), B's the client key (lookup, admission, the
quota sink, metrics by client). The B/A CPU column is then the cost of client keys and quotas
per request; with --redis the counters live in Redis (leases: routing/auth/quota_redis.py).

On a shared machine a before/after pair of whole benchmark runs minutes apart measures the
neighbours as much as the change. Here both routers run at once against the same fake
backends, and every round runs direct, A and B back to back (reversed in the next round),
so drift hits all three alike. The figure to trust most is the router's CPU time per
request (`/proc/PID/stat`), which other load disturbs far less than throughput.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import loadgen, procs
from bench.run import Scenario, ensure_wrk, fast_fake_endpoints, raise_fd_limit, start_fast_fakes

REPO = procs.REPO


def head_checkout(into: Path) -> Path:
    """HEAD's files (no .git) in a directory; the venv is shared."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, help="checkout of the baseline (default: git HEAD)")
    p.add_argument("--b", type=Path, default=REPO, help="checkout of the change (default: this tree)")
    p.add_argument("--server", choices=("daphne", "uvicorn"), default="daphne")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--c1", action="store_true", help="concurrency-1 scenarios instead of c=32")
    p.add_argument("--key", action="store_true", help="A: the router key, B: a client key with limits")
    p.add_argument("--redis", default="", help="REDIS_URL for both routers (with --key: counters in Redis)")
    p.add_argument(
        "--no-concurrency", action="store_true", help="with --key: the client key has no concurrency limit"
    )
    p.add_argument(
        "--a-client-key", action="store_true", help="with --key: A's requests carry the client key too"
    )
    args = p.parse_args(argv)
    ensure_wrk()
    raise_fd_limit()
    c = 1 if args.c1 else 32
    scenarios = [Scenario("ollama", True, c), Scenario("ollama", False, c), Scenario("openai", True, c)]
    started: list[procs.Proc] = []
    with tempfile.TemporaryDirectory(prefix="nomyo-ab-") as tmp:
        work = Path(tmp)
        tree_a = args.a
        if tree_a is None and args.key:
            tree_a = args.b
        if tree_a is None:
            tree_a = work / "a"
            tree_a.mkdir()
            head_checkout(tree_a)
        log_dir = work / "logs"
        try:
            fakes = start_fast_fakes(tokens=args.tokens, delay=0, log_dir=log_dir)
            started += fakes.values()
            db = procs.fleet_database(log_dir / "ab.sqlite3", fast_fake_endpoints(fakes))
            env = {"REDIS_URL": args.redis} if args.redis else {}
            auth = {"A": "", "B": ""}
            if args.key:
                env["ROUTER_API_KEY"] = auth["A"] = "bench-operator-key"
                auth["B"] = bench_client_key(db, concurrency=not args.no_concurrency)
                if args.a_client_key:
                    auth["A"] = auth["B"]
            routers: dict[str, procs.Proc] = {}
            for name, tree in (("A", tree_a), ("B", args.b)):
                if name == "B" and args.key and tree_a == args.b:
                    routers["B"] = routers["A"]  # one router: only the key differs between A and B
                    continue
                routers[name] = procs.start_router(
                    args.server,
                    database_url=db,
                    log_dir=log_dir,
                    name=f"router-{name}",
                    cwd=tree,
                    extra_env=env,
                )
                started.append(routers[name])
            print(
                f"A = {tree_a}\nB = {args.b}\n"
                f"server {args.server}, {args.rounds} rounds x {args.duration:g} s"
                + (
                    f"\nA: {'client' if args.a_client_key else 'router'} key,"
                    f" B: client key with limits{', Redis' if args.redis else ''}"
                    if args.key
                    else ""
                )
            )
            for sc in scenarios:
                for name, router in routers.items():
                    loadgen.run_wrk(router.url + sc.path, sc.body, connections=c, duration=1, auth=auth[name])
            runs: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
            for rnd in range(args.rounds):
                for sc in scenarios:
                    order = [("direct", fakes[sc.protocol]), ("A", routers["A"]), ("B", routers["B"])]
                    for name, proc in order if rnd % 2 == 0 else reversed(order):
                        cpu0 = proc.cpu_seconds()
                        res = loadgen.run_wrk(
                            proc.url + sc.path,
                            sc.body,
                            connections=c,
                            duration=args.duration,
                            auth=auth.get(name, ""),
                        )
                        cpu = (proc.cpu_seconds() - cpu0) * 1000 / max(1, res.requests)
                        runs.setdefault((sc.key, name), []).append((res.rps, res.p50_ms, cpu, res.failures))
            print(
                f"{'scenario':22s} {'direct':>8s} | {'A req/s':>8s} {'ratio':>6s} {'CPU ms':>7s} |"
                f" {'B req/s':>8s} {'ratio':>6s} {'CPU ms':>7s} | B/A CPU"
            )
            spreads = []
            for sc in scenarios:
                direct = statistics.mean(r[0] for r in runs[(sc.key, "direct")])
                cols = []
                cpus = {}
                for name in ("A", "B"):
                    rows = runs[(sc.key, name)]
                    rps = statistics.mean(r[0] for r in rows)
                    cpus[name] = statistics.median(r[2] for r in rows)
                    fails = sum(r[3] for r in rows)
                    cols.append(
                        f"{rps:8.0f} {rps / direct:6.3f} {cpus[name]:7.2f}"
                        + (f" FAILURES {fails}" if fails else "")
                    )
                # B/A: the median of each round's ratio (A and B measured back to back, so a
                # change of the machine's speed between rounds cancels), with the rounds' range.
                paired = sorted(
                    b[2] / a[2] for a, b in zip(runs[(sc.key, "A")], runs[(sc.key, "B")], strict=True)
                )
                spreads.append(f"{sc.key}: rounds' B/A {paired[0]:.3f}-{paired[-1]:.3f}")
                ratio = statistics.median(paired)
                print(f"{sc.key:22s} {direct:8.0f} | " + " | ".join(cols) + f" | {ratio:.3f}")
            print("\n".join(spreads))
        finally:
            for proc in reversed(started):
                proc.stop()
    return 0


def bench_client_key(database_url: str, *, concurrency: bool = True) -> str:
    """A client key whose every limit is set (but concurrency when not `concurrency`), far above
    what a benchmark reaches."""
    big = str(10**12)
    limits = ["--rpm", str(10**9), "--tpm", big, "--daily-tokens", big, "--monthly-tokens", big]
    if concurrency:
        limits += ["--concurrency", "100000"]
    made = procs.manage("client_key_create", "bench", *limits, database_url=database_url)
    return made.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
