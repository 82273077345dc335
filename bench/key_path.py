"""CPU of the key check and quota accounting per request, in one process, without the router around it.

    .venv/bin/python -m bench.key_path --redis redis://127.0.0.1:6379/12

What the lean handler does for a request's caller (routing/auth/keys.py `admit_request`: the
router key or a client key's lookup, its limits), then what the accounting sink does after the
reply (`quotas.charge`) and the release of its admission, from 32 tasks. The client key has
every limit set, high enough never to refuse. Rows: the router key and the client key, with
counters in process and in Redis (leases, routing/auth/quota_redis.py). The figure is this
process's CPU time (user + system) per request, the lowest of ROUNDS runs of REQUESTS; the
difference between a client key's row and the router key's is what a client key adds to a
request (bench/ab.py's `--key` measures the same inside the whole router, where the machine's
noise is larger than this difference).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

TASKS = 32
REQUESTS = 32_000
ROUNDS = 5
KEY = "nr-" + "k" * 43
ROUTER_KEY = "bench-router-key"


def measure(redis_url: str) -> dict[str, float]:
    """Microseconds of CPU per request for each row (see the module docstring)."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "nomyo_site.settings"
    os.environ["ROUTER_API_KEY"] = ROUTER_KEY
    import django

    django.setup()
    from django.conf import settings

    from routing.auth import keys
    from routing.auth.client_keys import KeyRecord, hash_key, key_store
    from routing.auth.principal import Principal
    from routing.auth.quotas import quotas

    big = 10**12
    limits = (
        ("rpm", 10**9),
        ("tpm", big),
        ("concurrency", 100_000),
        ("daily_tokens", big),
        ("monthly_tokens", big),
    )
    principal = Principal("bench", "key", limits=limits, key_id=random.randrange(1, 2**40))

    def use(url: str) -> None:
        """The key store as a router has it after loading the table (no database here)."""
        settings.REDIS_URL = url
        key_store._by_hash = {hash_key(KEY): KeyRecord(principal, True, None)}
        key_store._loaded_generation = key_store._generation
        key_store._loaded_at = time.monotonic() + 10**6
        key_store.redis_generation = None
        if url:
            import redis

            key_store.redis_generation = int(redis.Redis.from_url(url).get("nomyo:keys:generation") or 0)

    async def run(authorization: str, requests: int) -> None:
        async def one_client() -> None:
            for _ in range(requests // TASKS):
                caller, admission = await keys.admit_request(authorization, None)
                await asyncio.sleep(0)  # the request's work
                quotas.charge(caller, 40)
                admission.release()

        await asyncio.gather(*(one_client() for _ in range(TASKS)))

    async def main() -> dict[str, float]:
        out = {}
        rows = [
            ("router key", f"Bearer {ROUTER_KEY}", ""),
            ("client key, in process", f"Bearer {KEY}", ""),
            ("client key, Redis", f"Bearer {KEY}", redis_url),
        ]
        for label, authorization, url in rows:
            use(url)
            await run(authorization, REQUESTS // 10)  # warm: connections open, leases taken
            await asyncio.sleep(0.3)
            best = float("inf")
            for _ in range(ROUNDS):
                cpu = time.process_time()
                await run(authorization, REQUESTS)
                best = min(best, (time.process_time() - cpu) / REQUESTS * 1e6)
            out[label] = best
            if url:
                await quotas.redis.drained()
        return out

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.key_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--redis", required=True, help="REDIS_URL (use a database no router uses)")
    args = p.parse_args(argv)
    figures = measure(args.redis)
    base = figures["router key"]
    print(f"{'caller':26s} {'us/req':>8s} {'over the router key':>20s}")
    for label, us in figures.items():
        print(f"{label:26s} {us:8.1f} {us - base:+17.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
