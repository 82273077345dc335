"""CPU cost of a client key's quota work per request, in one process, for one or two trees.

    .venv/bin/python -m bench.quota_cost --redis redis://127.0.0.1:6379/12            # this tree
    .venv/bin/python -m bench.quota_cost --a /tmp/base --redis redis://127.0.0.1:6379/12  # A and B

What a router does for a keyed request, without the router around it: 32 tasks, each request
arriving after a random 0-2 ms, admitted (`quotas.admit`), working a random 0-4 ms, charged
40 tokens and released; a key with every limit set (high enough never to refuse), with or
without a concurrency limit. The figure is this process's CPU time (user + system, so the
socket calls to Redis count) per request, the lowest of ROUNDS runs of REQUESTS requests, and
the same with in-process counters (no REDIS_URL), whose figure is mostly the harness's own
sleeps and tasks: the difference is the cost of Redis. bench/ab.py measures the whole router.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = 32
REQUESTS = 9600
ROUNDS = 3


def measure(redis_url: str, concurrency: bool) -> float:
    """Microseconds of CPU per request (the lowest of ROUNDS runs), in this process's tree."""
    import django

    os.environ["DJANGO_SETTINGS_MODULE"] = "nomyo_site.settings"
    django.setup()
    from django.conf import settings

    from routing.auth.principal import Principal
    from routing.auth.quotas import Quotas

    settings.REDIS_URL = redis_url
    limits = [("rpm", 10**9), ("tpm", 10**12), ("daily_tokens", 10**12), ("monthly_tokens", 10**12)]
    if concurrency:
        limits.append(("concurrency", 100_000))
    principal = Principal("bench", "key", limits=tuple(limits), key_id=random.randrange(1, 2**40))
    generation = None  # the key generation a router's key copy carries (what lets leases be used)
    if redis_url:
        import redis

        generation = int(redis.Redis.from_url(redis_url).get("nomyo:keys:generation") or 0)

    async def run(quotas: Quotas, requests: int) -> None:
        rnd = random.Random(7)

        async def one_client() -> None:
            for _ in range(requests // TASKS):
                await asyncio.sleep(rnd.random() * 0.002)
                admission = await quotas.admit(principal, generation)
                await asyncio.sleep(rnd.random() * 0.004)
                quotas.charge(principal, 40)
                admission.release()

        await asyncio.gather(*(one_client() for _ in range(TASKS)))
        await quotas.redis.drained()

    async def main() -> float:
        quotas = Quotas()
        await run(quotas, REQUESTS // 10)  # warm: connections open, script loaded
        best = float("inf")
        for _ in range(ROUNDS):
            cpu = time.process_time()
            await run(quotas, REQUESTS)
            best = min(best, (time.process_time() - cpu) / REQUESTS * 1e6)
        return best

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quota_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, help="a checkout to measure beside this tree (B)")
    p.add_argument("--redis", required=True, help="REDIS_URL (use a database no router uses)")
    p.add_argument("--one", nargs=2, metavar=("URL", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:  # a child: measure in this tree, print one number
        print(f"{measure(args.one[0] if args.one[0] != '-' else '', args.one[1] == '1'):.1f}")
        return 0
    trees = ([("A", args.a)] if args.a else []) + [("B", REPO)]
    cases = [("Redis, concurrency limit", args.redis, "1"), ("Redis, no concurrency limit", args.redis, "0")]
    cases.append(("in process (harness)", "-", "1"))
    print(f"{'counters':30s} " + " ".join(f"{name + ' us/req':>12s}" for name, _ in trees))
    for label, url, concurrency in cases:
        figures = []
        for _, tree in trees:
            child = subprocess.run(  # this file, importing the tree's code
                [sys.executable, __file__, "--redis", url, "--one", url, concurrency],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True,
                text=True,
                check=True,
            )
            figures.append(child.stdout.strip().splitlines()[-1])
        print(f"{label:30s} " + " ".join(f"{f:>12s}" for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
