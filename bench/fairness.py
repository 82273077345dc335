"""The fairness phase of `make bench` (bench/run.py, `--only fairness`): fair queueing between keys.

One model on one fake backend with a few slots, a router with two client keys. Key "flood" sends
FLOOD requests at once; once they wait in the queue, key "single" sends SINGLE requests one after
the other. Measured: each of single's latencies, against what first come, first served would give
it (the requests queued ahead of it, served `limit` at a time, each taking the service time
measured alone), and how long the flood takes in all (fairness must not cost throughput).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench import procs

MODEL = "fair:latest"
OPERATOR = "bench-fairness-operator"
_QUEUED = re.compile(r"^router_queued\{[^}]*\} ([0-9.e+]+)$", re.M)


def _key(name: str, database_url: str) -> str:
    return procs.manage("client_key_create", name, database_url=database_url).stdout.strip().splitlines()[-1]


async def _measure(url: str, flood_key: str, single_key: str, flood: int, single: int) -> dict[str, Any]:
    body = {"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hello"}]}
    limits = httpx.Limits(max_connections=flood + 10, max_keepalive_connections=flood + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def one(key: str) -> float:
            started = time.perf_counter()
            reply = await http.post("/api/chat", json=body, headers={"Authorization": f"Bearer {key}"})
            reply.raise_for_status()
            return time.perf_counter() - started

        service = statistics.median([await one(single_key) for _ in range(5)])

        async def queued() -> int:
            text = (await http.get("/metrics", headers={"Authorization": f"Bearer {OPERATOR}"})).text
            return int(sum(float(n) for n in _QUEUED.findall(text)))

        started = time.perf_counter()
        floods = [asyncio.create_task(one(flood_key)) for _ in range(flood)]
        while await queued() < flood // 2:
            await asyncio.sleep(0.02)
        singles: list[dict[str, float]] = []
        for _ in range(single):
            ahead = await queued()
            latency = await one(single_key)
            singles.append({"queued_ahead": ahead, "latency_s": latency})
        await asyncio.gather(*floods)
        flood_s = time.perf_counter() - started
    return {"service_s": service, "singles": singles, "flood_s": flood_s}


def run(
    log_dir: Path, *, server: str = "daphne", flood: int = 200, single: int = 10, limit: int = 4
) -> dict[str, Any]:
    """The phase; returns its results (see the module docstring)."""
    started: list[procs.Proc] = []
    try:
        fake = procs.start_fake(
            "fake-fair", kind="ollama", models=[MODEL], tokens=10, delay=0.01, log_dir=log_dir
        )
        started.append(fake)
        spec = [{"name": "fake-fair", "url": fake.url, "kind": "ollama", "limit": limit}]
        db = procs.fleet_database(log_dir / "fairness.sqlite3", spec)
        flood_key, single_key = _key("flood", db), _key("single", db)
        router = procs.start_router(
            server,
            database_url=db,
            log_dir=log_dir,
            name="router-fairness",
            extra_env={"ROUTER_API_KEY": OPERATOR, "ROUTER_QUEUE_TIMEOUT": "600"},
        )
        started.append(router)
        measured = asyncio.run(_measure(router.url, flood_key, single_key, flood, single))
    finally:
        for proc in reversed(started):
            proc.stop()
    service = measured["service_s"]
    for row in measured["singles"]:
        # first come, first served: everything queued ahead, `limit` at a time, then its own turn
        row["fifo_estimate_s"] = (row["queued_ahead"] / limit + 1) * service
    latencies = [r["latency_s"] for r in measured["singles"]]
    return {
        "server": server,
        "flood": flood,
        "single": single,
        "limit": limit,
        "service_s": service,
        "single_latency_p50_s": statistics.median(latencies),
        "single_latency_max_s": max(latencies),
        "fifo_estimate_p50_s": statistics.median(r["fifo_estimate_s"] for r in measured["singles"]),
        "flood_s": measured["flood_s"],
        "flood_ideal_s": flood / limit * service,
        "singles": measured["singles"],
    }


def section(results: dict[str, Any]) -> list[str]:
    """The "Fair queueing between keys" section of docs/benchmarks.md."""
    f = results.get("fairness")
    if not f:
        return []
    m = results["meta"]
    return [
        "## Fair queueing between keys",
        "",
        f"Recorded on {m['date']} (`python -m bench.run --only fairness`). One model with {f['limit']} slots "
        f"(a reply takes {f['service_s'] * 1000:.0f} ms alone); key `flood` sends {f['flood']} requests at "
        f"once, then key `single` sends {f['single']} requests one after the other while the flood waits. "
        "First come, first served would make each of them wait for everything queued ahead of it.",
        "",
        "| | single's latency p50 | single's latency max | first come, first served (estimate, p50) "
        "| the whole flood | flood at full use of the slots |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {f['server']} | {f['single_latency_p50_s'] * 1000:.0f} ms"
        f" | {f['single_latency_max_s'] * 1000:.0f} ms | {f['fifo_estimate_p50_s'] * 1000:.0f} ms"
        f" | {f['flood_s']:.1f} s | {f['flood_ideal_s']:.1f} s |",
        "",
    ]
