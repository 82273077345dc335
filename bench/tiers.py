"""Tiers, weights and latency-aware ties, end to end (`python -m bench.tiers`).

Three fake Ollama servers, imported with `import_config` (so the per-endpoint `tier`/`weight`
mappings are what configures them), every one with 2 slots for the model:

- "fast" (tier 0) and "slow" (tier 0, its first byte 0.25 s later than fast's),
- "cpu" (tier 1).

The model is loaded on all three, so only the tier keeps requests off "cpu" and only the first
byte tells "fast" from "slow".

Two loads, each after a fresh router start (no first-byte averages yet):
- one at a time (ONE streamed requests): once both are measured the slow server gets a request
  only when the fast one is busier, which one at a time happens only when the next request
  arrives before the router has released the previous stream's slot (it does so just after the
  last chunk went out; with whole replies the slot is free before the reply is, and the slow
  server gets exactly its first, measuring, request);
- CONCURRENT requests in flight at once (TOTAL in all): tier 0's four slots fill first, the
  rest spills to tier 1; no server is ever past its 2 slots (the fakes count what they saw).

Printed: requests per server, the mean time to first byte seen by the client, and the most
requests each fake ran at once, as a Markdown table (docs/benchmarks.md, "Tiers and
latency-aware ties").
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench import procs

MODEL = "tiers:latest"
ONE = 60
CONCURRENT = 6
TOTAL = 120
TOKENS = 10
DELAY = 0.02  # seconds per token: a reply takes 0.2 s after its first byte
FIRST_BYTE = {"fast": 0.05, "slow": 0.30, "cpu": 0.05}
TIERS = {"fast": 0, "slow": 0, "cpu": 1}


async def _load(url: str, *, total: int, at_once: int) -> dict[str, Any]:
    """`total` streamed chats, `at_once` in flight: who served each, its time to first byte."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    served: Counter[str] = Counter()
    first_bytes: dict[str, list[float]] = {}
    queue = list(range(total))
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def worker() -> None:
            while queue:
                queue.pop()
                started = time.perf_counter()
                async with http.stream("POST", "/api/chat", json=body) as reply:
                    reply.raise_for_status()
                    name = reply.headers["x-router-endpoint"]
                    first: float | None = None
                    async for _ in reply.aiter_raw():
                        if first is None:
                            first = time.perf_counter() - started
                    first_bytes.setdefault(name, []).append(first or 0.0)
                served[name] += 1

        await asyncio.gather(*(worker() for _ in range(at_once)))
    return {
        "served": dict(served),
        "first_byte_ms": {n: 1000 * statistics.mean(v) for n, v in first_bytes.items()},
    }


def _phase(
    log_dir: Path, fakes: dict[str, procs.Proc], *, total: int, at_once: int, tag: str
) -> dict[str, Any]:
    for fake in fakes.values():
        httpx.post(fake.url + "/_fake/reset", timeout=5).raise_for_status()
    db = f"sqlite:///{log_dir}/tiers-{tag}.sqlite3"
    procs.manage("migrate", "--noinput", "-v", "0", database_url=db)
    config = log_dir / f"tiers-{tag}.yaml"
    lines = ["max_concurrent_connections: 2", "endpoints:"]
    lines += [f"  - {{url: {fake.url}, tier: {TIERS[name]}}}" for name, fake in fakes.items()]
    config.write_text("\n".join(lines) + "\n")
    procs.manage("import_config", str(config), database_url=db)
    # names: the url is the name until one is given; the bench names them after their role
    by_url = {fake.url: name for name, fake in fakes.items()}
    router = procs.start_router("daphne", database_url=db, log_dir=log_dir, name=f"router-tiers-{tag}")
    try:
        result = asyncio.run(_load(router.url, total=total, at_once=at_once))
    finally:
        router.stop()
    result["served"] = {by_url.get(k, k): v for k, v in result["served"].items()}
    result["first_byte_ms"] = {by_url.get(k, k): v for k, v in result["first_byte_ms"].items()}
    result["max_in_flight"] = {
        name: httpx.get(fake.url + "/_fake/stats", timeout=5).json()["max_in_flight"].get(MODEL, 0)
        for name, fake in fakes.items()
    }
    return result


def run(log_dir: Path) -> dict[str, Any]:
    started: list[procs.Proc] = []
    try:
        fakes: dict[str, procs.Proc] = {}
        for name in ("fast", "slow", "cpu"):
            fake = procs.start_fake(
                f"fake-{name}", kind="ollama", models=[MODEL], tokens=TOKENS, delay=DELAY, log_dir=log_dir
            )
            started.append(fake)
            # loaded everywhere, so within tier 0 only the first byte tells fast from slow
            config = {"first_byte_delay": FIRST_BYTE[name], "loaded": [MODEL]}
            httpx.post(fake.url + "/_fake/config", json=config, timeout=5).raise_for_status()
            fakes[name] = fake
        return {
            "one_at_a_time": _phase(log_dir, fakes, total=ONE, at_once=1, tag="one"),
            "concurrent": _phase(log_dir, fakes, total=TOTAL, at_once=CONCURRENT, tag="concurrent"),
        }
    finally:
        for proc in reversed(started):
            proc.stop()


def table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| load | server (tier) | requests | mean first byte (client) | most at once (limit 2) |",
        "|---|---|---:|---:|---:|",
    ]
    for label, key in (
        (f"one at a time, {ONE}", "one_at_a_time"),
        (f"{CONCURRENT} at once, {TOTAL}", "concurrent"),
    ):
        r = results[key]
        for name in ("fast", "slow", "cpu"):
            ms = r["first_byte_ms"].get(name)
            rows.append(
                f"| {label} | {name} ({TIERS[name]}) | {r['served'].get(name, 0)} "
                f"| {'-' if ms is None else f'{ms:.0f} ms'} | {r['max_in_flight'][name]} |"
            )
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nomyo-tiers-") as tmp:
        results = run(Path(tmp))
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
