"""The candidates for a model (routing/fleet/candidates.py), in-process against endpoints in the
database and probe replies from an httpx MockTransport: who advertises the model (by its key),
under which name, whether it is loaded, who is reachable, and who is out with its breaker open."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import httpx
import pytest
from asgiref.sync import sync_to_async

from routing.engine.board import Board
from routing.fleet import caches, candidates, health
from routing.fleet.breaker import State, breakers
from routing.fleet.registry import registry
from routing.models import Endpoint, ModelAlias
from routing.upstream import client as upstream_client

pytestmark = [pytest.mark.django_db(transaction=True)]

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    def reset() -> None:
        registry.clear()
        caches.clear_all()
        breakers.forget()

    reset()
    yield
    reset()
    upstream_client.set_transport_factory(None)


def servers(replies: dict[str, dict[str, httpx.Response | Exception]]) -> None:
    """host -> path -> the reply (or the exception a connection would raise)."""

    def handler(request: httpx.Request) -> httpx.Response:
        reply = replies[request.url.host].get(request.url.path, httpx.Response(404))
        if isinstance(reply, Exception):
            raise reply
        return reply

    upstream_client.set_transport_factory(lambda: httpx.MockTransport(handler))


def tags(*names: str) -> httpx.Response:
    return httpx.Response(200, json={"models": [{"name": n} for n in names]})


async def add(name: str, **fields: object) -> int:
    ep = await sync_to_async(Endpoint.objects.create)(name=name, url=f"http://{name}:11434", **fields)
    return int(ep.id)


async def lookup(model: str) -> candidates.Lookup:
    try:
        return await candidates.candidates_for(model)
    finally:
        await upstream_client.close_client()


@pytest.mark.asyncio
async def test_the_candidates_are_who_advertises_the_models_key_and_whether_it_is_loaded() -> None:
    a = await add("a")
    b = await add("b")
    await add("c")
    await add("off", enabled=False)
    servers(
        {
            "a": {"/api/tags": tags("llama3", "qwen:7b"), "/api/ps": tags("llama3:latest")},
            "b": {"/api/tags": tags("llama3:latest"), "/api/ps": tags()},
            "c": {"/api/tags": tags("qwen:7b"), "/api/ps": tags("qwen:7b")},
            "off": {"/api/tags": tags("llama3")},
        }
    )
    found = await lookup("llama3")  # the key: llama3:latest
    by_id = {c.endpoint.id: c for c in found.candidates}
    assert set(by_id) == {a, b}  # c lacks it, off is disabled
    assert by_id[a].backend_model == "llama3" and by_id[a].loaded
    assert by_id[b].backend_model == "llama3:latest" and not by_id[b].loaded
    assert found.reachable == 3 and found.failing_with_model == 0


@pytest.mark.asyncio
async def test_an_endpoint_whose_probe_fails_is_no_candidate_and_opens_its_breaker() -> None:
    a = await add("a")
    down = await add("down")
    servers(
        {
            "a": {"/api/tags": tags("llama3"), "/api/ps": tags()},
            "down": {"/api/tags": httpx.ConnectError("refused")},
        }
    )
    found = await lookup("llama3")
    assert [c.endpoint.id for c in found.candidates] == [a]
    assert found.reachable == 1
    assert breakers.view(down).state is State.OPEN  # a refused probe is strong evidence
    reprobe = health._reprobes.pop(down)  # it is probed in the background until it answers
    reprobe.cancel()


@pytest.mark.asyncio
async def test_an_open_breaker_is_counted_as_failing_with_the_model_it_advertised() -> None:
    a = await add("a")
    b = await add("b")
    servers(
        {
            "a": {"/api/tags": tags("llama3"), "/api/ps": tags()},
            "b": {"/api/tags": tags("llama3"), "/api/ps": tags()},
        }
    )
    assert len((await lookup("llama3")).candidates) == 2  # both seen advertising it
    breakers.failed(b, "connection refused", strong=True, name="b")
    found = await lookup("llama3")
    assert [c.endpoint.id for c in found.candidates] == [a]
    assert found.reachable == 1 and found.failing_with_model == 1
    other = await lookup("qwen:7b")  # b never advertised it: not failing "with" it
    assert other.candidates == [] and other.failing_with_model == 0


@pytest.mark.asyncio
async def test_an_openai_endpoint_is_never_loaded_and_is_not_asked_for_ps() -> None:
    oa = await add("oa", kind="openai")
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, json={"data": [{"id": "gpt-oss-20b"}]})

    upstream_client.set_transport_factory(lambda: httpx.MockTransport(handler))
    found = await lookup("gpt-oss-20b")
    assert [(c.endpoint.id, c.loaded) for c in found.candidates] == [(oa, False)]
    assert all(not p.endswith("/api/ps") for p in asked)


@pytest.mark.asyncio
async def test_concurrent_lookups_share_one_probe_per_endpoint() -> None:
    await add("a")
    calls: dict[str, int] = {}

    async def slow(request: httpx.Request) -> httpx.Response:
        calls[request.url.path] = calls.get(request.url.path, 0) + 1
        await asyncio.sleep(0.05)
        return tags("llama3")

    upstream_client.set_transport_factory(lambda: httpx.MockTransport(slow))
    try:
        results = await asyncio.gather(*(candidates.candidates_for("llama3") for _ in range(5)))
    finally:
        await upstream_client.close_client()
    assert all(len(r.candidates) == 1 for r in results)
    assert calls == {"/api/tags": 1, "/api/ps": 1}


@pytest.mark.asyncio
async def test_candidates_carry_tier_and_weight_and_a_failing_tier_spills_to_the_next() -> None:
    """The board spills to tier 1 when the only tier-0 server is failing (breaker open): it is no
    candidate, so tier 1 is the best there is; when it closes, tier 0 wins again."""
    gpu = await add("gpu", tier=0, weight=2)
    cpu = await add("cpu", tier=1)
    servers(
        {
            "gpu": {"/api/tags": tags("llama3"), "/api/ps": tags()},
            "cpu": {"/api/tags": tags("llama3"), "/api/ps": tags("llama3:latest")},
        }
    )
    found = await lookup("llama3")
    assert sorted((c.endpoint.id, c.endpoint.tier, c.endpoint.weight) for c in found.candidates) == [
        (gpu, 0, 2),
        (cpu, 1, 1),
    ]
    board = Board()
    lease = board.try_acquire("llama3:latest", found.candidates)
    assert lease is not None and lease.endpoint.id == gpu  # tier 0 though cpu has it loaded
    lease.release()
    breakers.failed(gpu, "connection refused", strong=True, name="gpu")
    lease = board.try_acquire("llama3:latest", (await lookup("llama3")).candidates)
    assert lease is not None and lease.endpoint.id == cpu
    lease.release()
    breakers.reset(gpu)
    lease = board.try_acquire("llama3:latest", (await lookup("llama3")).candidates)
    assert lease is not None and lease.endpoint.id == gpu


@pytest.mark.asyncio
async def test_an_alias_has_the_candidates_of_its_targets_each_under_its_servers_name() -> None:
    a = await add("a")
    b = await add("b")
    await add("c")
    await sync_to_async(ModelAlias.objects.create)(name="gpt-oss", targets="gpt-oss-120b\ngpt-oss:120b")
    servers(
        {
            "a": {"/api/tags": tags("gpt-oss:120b"), "/api/ps": tags("gpt-oss:120b")},
            "b": {"/api/tags": tags("gpt-oss-120b"), "/api/ps": tags()},
            "c": {"/api/tags": tags("llama3")},
        }
    )
    found = await lookup("gpt-oss:latest")
    # The alias's order (gpt-oss-120b first), each server's own spelling, its loaded flag.
    assert [(c.endpoint.id, c.backend_model, c.loaded) for c in found.candidates] == [
        (b, "gpt-oss-120b", False),
        (a, "gpt-oss:120b", True),
    ]
    assert [c.key for c in found.candidates] == ["gpt-oss-120b:latest", "gpt-oss:120b"]
    assert (await lookup("gpt-oss:120b")).candidates[0].endpoint.id == a  # a target, asked directly
    assert (await lookup("nothing")).candidates == []
