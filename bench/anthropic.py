"""What the Anthropic Messages translation costs the router, per request.

    .venv/bin/python -m bench.anthropic [--rounds 3] [--duration 4] [--tokens 32] [--c 32]

One router (daphne) in front of the two fast fakes (bench/run.py). For each server kind, whole
and streamed, wrk alternates the router's native route for that server (`/api/chat` on the
Ollama fake, `/v1/chat/completions` on the OpenAI-compatible one) with `/v1/messages` on the
same model, back to back (order reversed each round). The figure is the router's CPU time per
request (`/proc/PID/stat`): messages/native is the translation's relative cost (request
rewriting, reply events rebuilt per token) against a route that passes bytes through.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench import loadgen, procs
from bench.run import (
    OLLAMA_MODEL,
    OPENAI_MODEL,
    PROMPT,
    ensure_wrk,
    fast_fake_endpoints,
    raise_fd_limit,
    start_fast_fakes,
)


def bodies(kind: str, stream: bool) -> dict[str, tuple[str, str]]:
    """route name -> (path, body) for one server kind."""
    model = OLLAMA_MODEL if kind == "ollama" else OPENAI_MODEL
    native = "/api/chat" if kind == "ollama" else "/v1/chat/completions"
    anthropic = {"model": model, "max_tokens": 1000, "stream": stream, "messages": PROMPT}
    return {
        "native": (native, json.dumps({"model": model, "stream": stream, "messages": PROMPT})),
        "messages": ("/v1/messages", json.dumps(anthropic)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.anthropic", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--c", type=int, default=32)
    args = p.parse_args(argv)
    ensure_wrk()
    raise_fd_limit()
    started: list[procs.Proc] = []
    with tempfile.TemporaryDirectory(prefix="nomyo-anthropic-") as tmp:
        log_dir = Path(tmp)
        try:
            fakes = start_fast_fakes(tokens=args.tokens, delay=0, log_dir=log_dir)
            started += fakes.values()
            db = procs.fleet_database(log_dir / "bench.sqlite3", fast_fake_endpoints(fakes))
            router = procs.start_router("daphne", database_url=db, log_dir=log_dir)
            started.append(router)
            cases = [(kind, stream) for kind in ("ollama", "openai") for stream in (True, False)]
            for kind, stream in cases:  # warm-up
                for path, body in bodies(kind, stream).values():
                    loadgen.run_wrk(router.url + path, body, connections=args.c, duration=1)
            runs: dict[tuple[str, bool, str], list[tuple[float, float, int]]] = {}
            for rnd in range(args.rounds):
                for kind, stream in cases:
                    order = list(bodies(kind, stream).items())
                    for name, (path, body) in order if rnd % 2 == 0 else reversed(order):
                        cpu0 = router.cpu_seconds()
                        res = loadgen.run_wrk(
                            router.url + path, body, connections=args.c, duration=args.duration
                        )
                        cpu = (router.cpu_seconds() - cpu0) * 1000 / max(1, res.requests)
                        runs.setdefault((kind, stream, name), []).append((res.rps, cpu, res.failures))
            print(f"daphne, c={args.c}, {args.tokens} tokens, {args.rounds} rounds x {args.duration:g} s")
            head = f"{'native req/s':>12s} {'CPU ms':>7s} | {'messages req/s':>14s} {'CPU ms':>7s}"
            print(f"{'server, reply':18s} {head} | CPU ratio")
            for kind, stream in cases:
                cols = {}
                for name in ("native", "messages"):
                    rows = runs[(kind, stream, name)]
                    fails = sum(r[2] for r in rows)
                    cols[name] = (
                        statistics.mean(r[0] for r in rows),
                        statistics.median(r[1] for r in rows),
                        fails,
                    )
                label = f"{kind}, {'stream' if stream else 'whole'}"
                n, m = cols["native"], cols["messages"]
                failed = f" FAILURES {n[2] + m[2]}" if n[2] + m[2] else ""
                figures = f"{n[0]:12.0f} {n[1]:7.2f} | {m[0]:14.0f} {m[1]:7.2f}"
                print(f"{label:18s} {figures} | {m[1] / n[1]:.2f}{failed}")
        finally:
            for proc in reversed(started):
                proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
