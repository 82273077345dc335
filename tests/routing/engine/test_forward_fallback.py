"""Aliases and fallback chains through routing/engine/proxy.forward, in-process against fake
backends on loopback ports.

- an alias is served by the servers of its targets, each under its own name, and shares each
  real model's cap on each server (slots are per server and real model);
- when no server of the asked model can take the request (none has it, refused, busy past
  ROUTER_FALLBACK_WAIT, queue full) the next model of its chain answers, in order, one level;
- the reply names the model that answered (X-Router-Model) and the sinks get the real model
  and the one asked for;
- and on every path the slots and queues come back empty, cancellation included.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from bench.fake_backend import ThreadedFake
from routing.auth.principal import ANONYMOUS, Principal
from routing.core.errors import ApiError
from routing.engine import proxy
from routing.engine.attempt import Attempt
from routing.engine.board import board
from routing.fleet import candidates, routes
from routing.fleet.breaker import breakers
from routing.fleet.candidates import Candidate
from routing.fleet.registry import registry
from routing.upstream import client
from tests.conftest import free_port
from tests.routing.engine.attempts import ollama_chat
from tests.routing.engine.sinks import Book
from tests.routing.fleet.factories import candidate

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db]


def fleet(
    monkeypatch: pytest.MonkeyPatch,
    served: dict[str, list[Candidate]],
    *,
    aliases: dict[str, str] | None = None,
    chains: dict[str, str] | None = None,
) -> list[str]:
    """The candidates per real model key; an alias gets its targets' candidates, as
    candidates.candidates_for does. Returns the names looked up, in order."""
    table = routes.build(list((aliases or {}).items()), list((chains or {}).items()))
    monkeypatch.setattr(registry, "cached_routes", lambda: table)

    async def reloaded() -> routes.ModelRoutes:
        return table

    monkeypatch.setattr(registry, "routes", reloaded)
    asked: list[str] = []

    async def lookup(model: str) -> candidates.Lookup:
        asked.append(model)
        found = [c for t in table.targets(model) for c in served.get(candidates.model_key(t), [])]
        return candidates.Lookup(found, reachable=1)

    monkeypatch.setattr(candidates, "candidates_for", lookup)
    return asked


def plan(cand: Candidate) -> Attempt:
    """An Ollama chat for the candidate's own name of the model (as the views build it)."""
    return ollama_chat(cand, cand.backend_model)


async def forward(model: str, principal: Principal = ANONYMOUS) -> Any:
    return await proxy.forward("/api/chat", model=model, plan=plan, principal=principal)


async def settled() -> None:
    assert board.active() == {}
    assert board.queued_total() == 0
    await client.close_client()


async def until_queued(n: int) -> None:
    """Wait (two seconds at most) for `n` entries in the board's queues (an alias waiting for
    several real models has one in each)."""
    for _ in range(200):
        if sum(board.queued().values()) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} queue entries not reached: {board.queued()}")


def cand(fake_url: str, ep_id: int, name: str, *, limit: int = 1, loaded: bool = False) -> Candidate:
    return candidate(ep_id, url=fake_url, model=name, limit=limit, loaded=loaded)


async def test_an_alias_reaches_a_server_under_its_own_name_and_names_the_real_model(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    gpu = fakes(models=["gpt-oss:120b"], tokens=2)
    fleet(
        monkeypatch,
        {"gpt-oss:120b": [cand(gpu.url, 9_301, "gpt-oss:120b")]},
        aliases={"gpt-oss": "gpt-oss:120b"},
    )
    response = await forward("gpt-oss")
    assert response.status_code == 200
    assert response["X-Router-Model"] == "gpt-oss:120b" and response["X-Router-Endpoint"] == "ep9301"
    assert json.loads(response.content)["model"] == "gpt-oss:120b"  # the model that answered
    assert gpu.stats.bodies_for("/api/chat")[-1]["model"] == "gpt-oss:120b"
    assert book.entries == [("record", gpu.url, "gpt-oss:120b", "gpt-oss:latest")]
    await settled()


async def test_a_plain_request_records_no_requested_model(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    gpu = fakes(models=["llama3:latest"], tokens=2)
    fleet(monkeypatch, {"llama3:latest": [cand(gpu.url, 9_305, "llama3:latest")]})
    response = await forward("llama3")
    assert response["X-Router-Model"] == "llama3:latest"
    assert book.entries == [("record", gpu.url, "llama3:latest", "")]
    await settled()


async def test_an_alias_shares_the_real_models_cap_on_each_server(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch, settings
):
    settings.ROUTER_QUEUE_TIMEOUT = 0.2
    gpu = fakes(models=["gpt-oss:120b"], tokens=2)
    only = cand(gpu.url, 9_311, "gpt-oss:120b")
    fleet(monkeypatch, {"gpt-oss:120b": [only]}, aliases={"gpt-oss": "gpt-oss:120b"})
    held = board.try_acquire("gpt-oss:120b", [only])  # a direct request holds the one slot
    assert held is not None
    with pytest.raises(ApiError) as caught:
        await forward("gpt-oss")
    assert caught.value.status == 503 and gpu.stats.total_requests() == 0
    held.release()
    await settled()


async def test_an_alias_waits_in_every_targets_queue_and_takes_the_first_free_slot(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    one = fakes(models=["gpt-oss:120b"], tokens=2)
    two = fakes(models=["gpt-oss-120b:latest"], tokens=2)
    a = cand(one.url, 9_321, "gpt-oss:120b")
    b = cand(two.url, 9_322, "gpt-oss-120b:latest")
    fleet(
        monkeypatch,
        {"gpt-oss:120b": [a], "gpt-oss-120b:latest": [b]},
        aliases={"gpt-oss": "gpt-oss:120b\ngpt-oss-120b"},
    )
    held_a, held_b = board.try_acquire(a.key, [a]), board.try_acquire(b.key, [b])
    assert held_a is not None and held_b is not None
    waiting = asyncio.ensure_future(forward("gpt-oss"))
    await until_queued(2)
    assert board.queued() == {a.key: 1, b.key: 1}
    held_b.release()  # the second target's server frees first
    response = await waiting
    assert response["X-Router-Model"] == "gpt-oss-120b:latest" and one.stats.total_requests() == 0
    assert board.queued_total() == 0  # the other wait left its queue
    held_a.release()
    await settled()


async def test_an_alias_waiting_in_several_queues_counts_once_against_the_queue_max(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch, settings
):
    settings.ROUTER_QUEUE_MAX = 1
    one = fakes(models=["m-a:latest"], tokens=2)
    two = fakes(models=["m-b:latest"], tokens=2)
    a, b = cand(one.url, 9_343, "m-a:latest"), cand(two.url, 9_344, "m-b:latest")
    fleet(monkeypatch, {a.key: [a], b.key: [b]}, aliases={"m": "m-a\nm-b"})
    held_a, held_b = board.try_acquire(a.key, [a]), board.try_acquire(b.key, [b])
    assert held_a is not None and held_b is not None
    waiting = asyncio.ensure_future(forward("m"))
    await until_queued(2)  # in both queues, as one request
    assert board.queued() == {a.key: 1, b.key: 1} and board.queued_total() == 1
    with pytest.raises(ApiError) as full:  # a second request finds the queue full
        await forward("m-a")
    assert full.value.status == 503
    held_b.release()
    response = await waiting
    assert response["X-Router-Model"] == "m-b:latest"
    held_a.release()
    await settled()


async def test_cancelling_an_alias_waiting_in_several_queues_leaves_nothing_behind(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    one = fakes(models=["m-a:latest"])
    two = fakes(models=["m-b:latest"])
    a, b = cand(one.url, 9_331, "m-a:latest"), cand(two.url, 9_332, "m-b:latest")
    fleet(monkeypatch, {a.key: [a], b.key: [b]}, aliases={"m": "m-a\nm-b"})
    held_a, held_b = board.try_acquire(a.key, [a]), board.try_acquire(b.key, [b])
    assert held_a is not None and held_b is not None
    waiting = asyncio.ensure_future(forward("m"))
    await until_queued(2)
    held_a.release()  # granted to the waiter in the same instant as it is cancelled
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    held_b.release()
    await settled()  # the slot handed to the cancelled wait came back too
    assert one.stats.total_requests() == 0 and two.stats.total_requests() == 0


async def test_a_model_nobody_serves_falls_back_to_the_next_of_its_chain(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    local = fakes(models=["llama3:latest"], tokens=2)
    asked = fleet(
        monkeypatch, {"llama3:latest": [cand(local.url, 9_341, "llama3:latest")]}, chains={"gpt-4": "llama3"}
    )
    response = await forward("gpt-4")
    assert response.status_code == 200 and response["X-Router-Model"] == "llama3:latest"
    assert json.loads(response.content)["model"] == "llama3:latest"
    assert asked == ["gpt-4", "llama3"]
    assert book.entries == [("record", local.url, "llama3:latest", "gpt-4:latest")]
    await settled()


async def test_a_model_whose_only_server_is_down_falls_back(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    down = f"http://127.0.0.1:{free_port()}"
    spare = fakes(models=["small:latest"], tokens=2)
    fleet(
        monkeypatch,
        {
            "big:latest": [cand(down, 9_351, "big:latest")],
            "small:latest": [cand(spare.url, 9_352, "small:latest")],
        },
        chains={"big": "small"},
    )
    response = await forward("big")
    assert response.status_code == 200 and response["X-Router-Model"] == "small:latest"
    assert breakers.is_open(9_351)
    assert book.entries == [("record", spare.url, "small:latest", "big:latest")]
    await settled()


async def test_a_busy_model_falls_back_after_the_fallback_wait(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch, settings
):
    settings.ROUTER_FALLBACK_WAIT = 0.1
    busy = fakes(models=["big:latest"], tokens=2)
    spare = fakes(models=["small:latest"], tokens=2)
    first = cand(busy.url, 9_361, "big:latest")
    fleet(
        monkeypatch,
        {"big:latest": [first], "small:latest": [cand(spare.url, 9_362, "small:latest")]},
        chains={"big": "small"},
    )
    held = board.try_acquire(first.key, [first])
    assert held is not None
    response = await forward("big")
    assert response["X-Router-Model"] == "small:latest" and busy.stats.total_requests() == 0
    held.release()
    await settled()


async def test_a_full_queue_falls_back_at_once(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch, settings
):
    settings.ROUTER_QUEUE_MAX = 0
    settings.ROUTER_FALLBACK_WAIT = 30  # never reached: a full queue does not wait
    busy = fakes(models=["big:latest"])
    spare = fakes(models=["small:latest"], tokens=2)
    first = cand(busy.url, 9_371, "big:latest")
    fleet(
        monkeypatch,
        {"big:latest": [first], "small:latest": [cand(spare.url, 9_372, "small:latest")]},
        chains={"big": "small"},
    )
    held = board.try_acquire(first.key, [first])
    assert held is not None
    response = await asyncio.wait_for(forward("big"), 5)
    assert response["X-Router-Model"] == "small:latest"
    held.release()
    await settled()


async def test_the_chain_is_tried_in_order_and_only_one_level_deep(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    third = fakes(models=["c:latest"], tokens=2)
    deeper = fakes(models=["d:latest"], tokens=2)
    served = {
        "c:latest": [cand(third.url, 9_381, "c:latest")],
        "d:latest": [cand(deeper.url, 9_382, "d:latest")],
    }
    asked = fleet(monkeypatch, served, chains={"a": "b\nc", "b": "d"})
    response = await forward("a")
    assert response["X-Router-Model"] == "c:latest" and asked == ["a", "b", "c"]
    asked.clear()
    fleet(monkeypatch, served, chains={"a": "b", "b": "d"})
    with pytest.raises(ApiError) as caught:
        await forward("a")  # b's own fallback d is not followed
    assert caught.value.status == 404 and "'a'" in caught.value.message
    assert deeper.stats.total_requests() == 0
    await settled()


async def test_when_every_model_fails_the_most_telling_error_is_kept(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch, settings
):
    settings.ROUTER_FALLBACK_WAIT = 0.05
    settings.ROUTER_QUEUE_TIMEOUT = 0.2
    busy = fakes(models=["big:latest"])
    first = cand(busy.url, 9_391, "big:latest")
    fleet(monkeypatch, {"big:latest": [first]}, chains={"big": "nowhere\nbig:latest"})
    held = board.try_acquire(first.key, [first])
    assert held is not None
    with pytest.raises(ApiError) as caught:
        await forward("big")  # busy, then not found, then big again: skipped, already tried
    assert caught.value.status == 503 and "stayed busy" in caught.value.message
    held.release()
    await settled()


async def test_a_fallback_the_key_may_not_use_is_skipped(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    secret = fakes(models=["secret:latest"], tokens=2)
    open_one = fakes(models=["open:latest"], tokens=2)
    fleet(
        monkeypatch,
        {
            "secret:latest": [cand(secret.url, 9_401, "secret:latest")],
            "open:latest": [cand(open_one.url, 9_402, "open:latest")],
        },
        chains={"gone": "secret\nopen"},
    )
    team = Principal("team", "key", models=("gone", "open"))
    response = await forward("gone", team)
    assert response["X-Router-Model"] == "open:latest" and secret.stats.total_requests() == 0
    await settled()


async def test_a_key_may_use_an_alias_by_its_targets_never_by_its_name(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    big = fakes(models=["mistral:latest"], tokens=2)
    small = fakes(models=["qwen2:7b"], tokens=2)
    fleet(
        monkeypatch,
        {
            "mistral:latest": [cand(big.url, 9_411, "mistral:latest")],
            "qwen2:7b": [cand(small.url, 9_412, "qwen2:7b")],
        },
        aliases={"llama3-big": "mistral", "qwen-alias": "qwen2:7b"},
    )
    team = Principal("team", "key", models=("llama3*", "qwen2:7b"))
    with pytest.raises(ApiError) as refused:  # the name matches llama3*, the model it reaches does not
        await forward("llama3-big", team)
    assert refused.value.status == 403 and refused.value.code == "model_not_allowed"
    assert big.stats.total_requests() == 0
    response = await forward("qwen-alias", team)  # an alias of a model the key may use
    assert response.status_code == 200 and response["X-Router-Model"] == "qwen2:7b"
    await settled()


async def test_an_alias_reaches_only_the_targets_the_key_may_use(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    allowed = fakes(models=["m-a:latest"], tokens=2)
    other = fakes(models=["m-b:latest"], tokens=2)
    a, b = cand(allowed.url, 9_421, "m-a:latest"), cand(other.url, 9_422, "m-b:latest")
    fleet(monkeypatch, {a.key: [a], b.key: [b]}, aliases={"m": "m-b\nm-a"})
    team = Principal("team", "key", models=("m-a",))
    for _ in range(6):
        response = await forward("m", team)
        assert response["X-Router-Model"] == "m-a:latest"
    assert other.stats.total_requests() == 0 and allowed.stats.total_requests() == 6
    held = board.try_acquire(a.key, [a])  # m-a busy: anyone else is served by m-b ...
    assert held is not None
    assert (await forward("m"))["X-Router-Model"] == "m-b:latest"
    waiting = asyncio.ensure_future(forward("m", team))  # ... the key waits for m-a
    await until_queued(1)
    assert board.queued() == {a.key: 1} and other.stats.total_requests() == 1
    held.release()
    assert (await waiting)["X-Router-Model"] == "m-a:latest"
    await settled()
