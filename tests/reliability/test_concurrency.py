"""Concurrency and caches: slot limits under contention, exact tokens, coalesced refreshes.

Many simultaneous requests for one model on two endpoints must never put more requests
on an endpoint than its limit (checked on the backend's side, which cannot be fooled by
the router's own bookkeeping), the router's slot gauges must stay within the limits and
return to exactly zero, and every token must be counted once. Fleet-wide lists must stay
consistent while endpoints are created, disabled, deleted and repointed, and a burst of
list requests must cost each backend a single refresh.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import httpx
import pytest

from routing.fleet import services
from routing.models import Endpoint
from tests.conftest import wait_until
from tests.reliability.support import (
    MODEL_KEY,
    PROMPT_TOKENS,
    Totals,
    async_client,
    chat,
    fake_totals,
    in_flight,
    queued,
    run_async,
    sampling,
    slow_route,
    wait_db_totals,
    wait_idle,
)

pytestmark = pytest.mark.timeout(60)

KINDS = list(itertools.product(("ollama", "openai"), (False, True)))


def test_it_never_exceeds_the_limits_and_returns_every_slot_to_zero_with_exact_tokens(
    fakes, endpoint, router
):
    tokens = 4
    first = fakes(models=[MODEL_KEY], tokens=tokens, delay=0.01)
    second = fakes(models=[MODEL_KEY], tokens=tokens, delay=0.01)
    limits = {"first": 2, "second": 3}
    endpoint(first.url, name="first", max_concurrent_connections=limits["first"])
    endpoint(second.url, name="second", max_concurrent_connections=limits["second"])
    server = router()
    total = 160

    async def burst() -> list[Any]:
        async with async_client(server) as client:
            return await asyncio.gather(
                *(
                    chat(client, protocol, stream=stream, tokens=tokens)
                    for protocol, stream in itertools.islice(itertools.cycle(KINDS), total)
                )
            )

    with sampling(server) as scrapes:
        replies = run_async(burst, watchdog=40)
    assert {r.endpoint for r in replies} == {"first", "second"}
    # the router's view, sampled while the burst ran: within the limits, never negative
    seen = [s for scrape in scrapes.metrics for s in scrape.find("router_in_flight")]
    assert seen, "no scrape caught a request in flight"
    for sample in seen:
        assert 0 <= sample.value <= limits[sample.labels["endpoint"]], sample
    assert all(s.value >= 0 for scrape in scrapes.metrics for s in scrape.find("router_queued"))
    by_url = {first.url: limits["first"], second.url: limits["second"]}
    for usage in scrapes.usage:  # /api/usage, NOMYO Router's view of the same counters
        for url, models in usage.items():
            assert all(0 <= n <= by_url[url] for n in models.values()), usage
    # the backends' view: the limits were reached but never exceeded
    assert first.stats.max_in_flight == {MODEL_KEY: limits["first"]}
    assert second.stats.max_in_flight == {MODEL_KEY: limits["second"]}
    wait_idle(server)
    assert first.stats.in_flight == {MODEL_KEY: 0} and second.stats.in_flight == {MODEL_KEY: 0}
    # every token reported by a backend is counted once, nothing invented
    assert fake_totals(first, second) == (total * PROMPT_TOKENS, total * tokens)
    wait_db_totals(Totals(total * PROMPT_TOKENS, total * tokens, total, 0))


def _bump_limits() -> None:
    """Change every endpoint, so the router drops what it cached about them on its next reload."""
    for ep in Endpoint.objects.all():
        ep.max_concurrent_connections += 1
        ep.save()
    services.endpoints_changed(None)


def test_it_refreshes_each_endpoint_once_for_a_burst_of_200_tags_and_200_ps(fakes, endpoint, router):
    backends = [fakes(models=[f"only{i}:latest", MODEL_KEY], loaded=[f"only{i}:latest"]) for i in range(3)]
    for i, fake in enumerate(backends):
        endpoint(fake.url, name=f"ep{i}", max_concurrent_connections=2)
    server = router()
    for fake in backends:
        # each refresh stays in flight long enough for the whole burst to arrive during it
        slow_route(fake, "GET", "/api/tags", 0.5)
        slow_route(fake, "GET", "/api/ps", 0.5)
    _bump_limits()
    time.sleep(0.5)  # older than ROUTER_REGISTRY_RELOAD: the next request reloads and invalidates
    for fake in backends:
        fake.stats.reset()

    async def burst() -> list[tuple[int, frozenset[str]]]:
        async with async_client(server) as client:

            async def names(path: str) -> tuple[int, frozenset[str]]:
                async with client.get(path) as response:
                    models = (await response.json())["models"]
                    return response.status, frozenset(m["name"] for m in models)

            return await asyncio.gather(
                *(names("/api/tags") for _ in range(200)), *(names("/api/ps") for _ in range(200))
            )

    replies = run_async(burst, watchdog=40)
    assert {status for status, _ in replies} == {200}
    tag_sets = {found for _, found in replies[:200]}
    ps_sets = {found for _, found in replies[200:]}
    assert tag_sets == {frozenset({MODEL_KEY, "only0:latest", "only1:latest", "only2:latest"})}
    assert ps_sets == {frozenset({"only0:latest", "only1:latest", "only2:latest"})}
    for fake in backends:
        assert fake.stats.requests == {"/api/tags": 1, "/api/ps": 1}


class Hammer:
    """Threads that keep asking for /api/tags and /api/ps and keep every answer."""

    def __init__(self, url: str, threads: int = 6) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: list[tuple[str, int, frozenset[str]]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        path = "/api/tags" if i % 2 == 0 else "/api/ps"
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                response = client.get(path)
                names = frozenset(m["name"] for m in response.json()["models"])
                with self._lock:
                    self.answers.append((path, response.status_code, names))

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(15)


def test_it_keeps_tags_and_ps_consistent_while_endpoints_change(fakes, endpoint, router):
    a = fakes(models=["a1:latest", "shared:latest"], loaded=["a1:latest"])
    b = fakes(models=["b1:latest", "shared:latest"], loaded=["b1:latest"])
    c = fakes(models=["c1:latest"], loaded=["c1:latest"])
    d = fakes(models=["d1:latest"], loaded=["d1:latest"])
    ep_a = endpoint(a.url, name="a", max_concurrent_connections=1)
    ep_b = endpoint(b.url, name="b", max_concurrent_connections=1)
    server = router()

    def state(*backends: Any) -> tuple[frozenset[str], frozenset[str]]:
        tags = frozenset(m for f in backends for m in f.config.models)
        ps = frozenset(m for f in backends for m in f.config.loaded)
        return tags, ps

    def observed(expected: tuple[frozenset[str], frozenset[str]]) -> None:
        """The router answers exactly the new state soon (stale entries are not kept)."""

        def now() -> tuple[frozenset[str], frozenset[str]]:
            tags = httpx.get(server.url + "/api/tags").json()["models"]
            ps = httpx.get(server.url + "/api/ps").json()["models"]
            return frozenset(m["name"] for m in tags), frozenset(m["name"] for m in ps)

        wait_until(lambda: now() == expected, timeout=5)

    states = [state(a, b)]
    with Hammer(server.url) as hammer:
        observed(states[-1])
        ep_c = endpoint(c.url, name="c", max_concurrent_connections=1)
        states.append(state(a, b, c))
        observed(states[-1])
        services.endpoints_set_enabled(endpoint_ids=[ep_a.id], enabled=False)
        states.append(state(b, c))
        observed(states[-1])
        Endpoint.objects.filter(id=ep_b.id).delete()
        states.append(state(c))
        observed(states[-1])
        # a changes while disabled; what the router knew about it must not come back
        a.config.models = [*a.config.models, "a2:latest"]
        a.config.loaded = ["a2:latest"]
        services.endpoints_set_enabled(endpoint_ids=[ep_a.id], enabled=True)
        states.append(state(a, c))
        observed(states[-1])
        # the same row now points at another server: nothing of the old one may remain
        Endpoint.objects.filter(id=ep_c.id).update(url=d.url)
        states.append(state(a, d))
        observed(states[-1])
        time.sleep(0.3)
    assert len(hammer.answers) > 50
    valid_tags = {tags for tags, _ in states}
    valid_ps = {ps for _, ps in states}
    for path, status, names in hammer.answers:
        assert status == 200
        assert names in (valid_tags if path == "/api/tags" else valid_ps), (path, sorted(names))
    final_tags, final_ps = states[-1]
    assert [names for path, _, names in hammer.answers if path == "/api/tags"][-1] == final_tags
    assert [names for path, _, names in hammer.answers if path == "/api/ps"][-1] == final_ps
    assert not in_flight(server) and not queued(server)
