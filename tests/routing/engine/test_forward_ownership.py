"""The slot taken for a request comes back on every path through proxy.forward: whatever
raises between reserving it and handing it to the reply (the planner, the send, reading the
reply, building the relay, cancellation), with and without the cluster claim in Redis.

In-process: forward() runs in the test's loop against a fake backend on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.fake_backend import ThreadedFake
from routing.auth.principal import ANONYMOUS
from routing.core.errors import ApiError
from routing.engine import attempt, proxy
from routing.engine.board import board
from routing.engine.cluster import cluster
from routing.fleet import candidates
from routing.fleet.breaker import breakers
from routing.fleet.candidates import Candidate
from routing.protocols.common.relays import OllamaStream, ollama_body
from routing.upstream import client
from tests.integration.test_cluster import _redis_answers
from tests.routing.fleet import factories

MODEL = "llama3:latest"
EP_ID = 9_001


@pytest.fixture(params=["local", "cluster"])
def mode(request, settings) -> Iterator[str]:
    if request.param == "cluster":
        if not _redis_answers():
            pytest.skip("no Redis at 127.0.0.1:6379")
        settings.REDIS_URL = "redis://127.0.0.1:6379/15"
    else:
        settings.REDIS_URL = ""
    board.clear()
    breakers.forget()
    yield request.param
    board.clear()
    breakers.forget()


def candidate(url: str, limit: int = 2, ep_id: int = EP_ID) -> Candidate:
    return factories.candidate(ep_id, url=url, model=MODEL, limit=limit, loaded=True)


def use_candidates(monkeypatch: pytest.MonkeyPatch, *cands: Candidate) -> None:
    async def lookup(model: str) -> candidates.Lookup:
        return candidates.Lookup(list(cands), reachable=len(cands))

    monkeypatch.setattr(candidates, "candidates_for", lookup)


def planner(
    *, stream: bool, fail_plan: bool = False, fail_read: bool = False, fail_relay: bool = False
) -> attempt.Planner:
    def read(body: bytes) -> Any:
        if fail_read:
            raise ValueError("unexpected reply shape")
        return ollama_body(body)

    def relay() -> Any:
        if fail_relay:
            raise KeyError("relay state")
        return OllamaStream()

    def plan(cand: Candidate) -> attempt.Attempt:
        if fail_plan:
            # what a translation does with `images: [5]`: a TypeError from deep inside
            raise TypeError("sequence item 0: expected str instance, int found")
        body = {
            "model": cand.backend_model,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
        }
        return attempt.Attempt(
            url=cand.endpoint.url + "/api/chat",
            body=json.dumps(body).encode(),
            relay=relay,
            read_body=read,
            stream=stream,
        )

    return plan


async def settled() -> None:
    """Nothing held anywhere: the board, the cluster's claims (freed in the background)."""
    assert board.active() == {}
    assert board.queued_total() == 0
    assert cluster.held() == 0
    await client.close_client()


async def forward(plan: attempt.Planner) -> Any:
    return await proxy.forward("/api/chat", model=MODEL, plan=plan, principal=ANONYMOUS)


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_planner_that_raises_is_a_400_and_gives_the_slot_back(
    mode, fakes: Callable[..., ThreadedFake], monkeypatch
):
    fake = fakes(models=[MODEL])
    use_candidates(monkeypatch, candidate(fake.url, limit=1))
    for _ in range(3):  # with limit 1, a leaked slot would make the second wait and fail
        with pytest.raises(ApiError) as caught:
            await asyncio.wait_for(forward(planner(stream=False, fail_plan=True)), 5)
        assert caught.value.status == 400 and "expected str instance" in caught.value.message
        await asyncio.sleep(0)
        assert board.active() == {}
    assert fake.stats.total_requests() == 0  # nothing was sent
    assert breakers.view(EP_ID).state.value == "closed"  # not evidence about the server
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_failed_send_gives_the_slot_back(mode, monkeypatch):
    from tests.conftest import free_port

    use_candidates(monkeypatch, candidate(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ApiError) as caught:
        await forward(planner(stream=True))
    assert caught.value.status == 502 and "connection refused" in caught.value.message
    assert breakers.is_open(EP_ID)  # refused: evidence about the server
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
@pytest.mark.parametrize("stream,stage", [(False, "read"), (True, "relay")])
async def test_a_reply_that_cannot_be_read_gives_the_slot_back(
    stream, stage, mode, fakes: Callable[..., ThreadedFake], monkeypatch
):
    fake = fakes(models=[MODEL])
    use_candidates(monkeypatch, candidate(fake.url, limit=1))
    plan = planner(stream=stream, fail_read=stage == "read", fail_relay=stage == "relay")
    for _ in range(2):
        with pytest.raises(ApiError) as caught:
            await forward(plan)
        assert caught.value.status == 502
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
@pytest.mark.parametrize("where", ["waiting for the head", "reading the body"])
async def test_cancellation_gives_the_slot_back(where, mode, fakes: Callable[..., ThreadedFake], monkeypatch):
    if where == "waiting for the head":
        fake = fakes(models=[MODEL], first_byte_delay=5)
    else:
        fake = fakes(models=[MODEL], tokens=50, delay=0.1)  # a whole reply that takes 5 s
    use_candidates(monkeypatch, candidate(fake.url, limit=1))
    task = asyncio.create_task(forward(planner(stream=False)))
    await asyncio.sleep(0.5)
    assert sum(board.active().values()) == 1 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert board.active() == {}
    await asyncio.sleep(0.3)
    assert fake.stats.cancelled == 1  # the upstream request was dropped too
    assert breakers.view(EP_ID).state.value == "closed"
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_stream_owns_its_slot_until_it_is_finished(
    mode, fakes: Callable[..., ThreadedFake], monkeypatch
):
    fake = fakes(models=[MODEL], tokens=4)
    use_candidates(monkeypatch, candidate(fake.url, limit=1))
    response = await forward(planner(stream=True))
    assert isinstance(response, proxy.ProxyStreamingResponse)
    assert sum(board.active().values()) == 1  # handed over, not released early
    await response.finish()  # never iterated: the client went away before the first chunk
    await settled()


def recovering(hook: attempt.Recover, *, stream: bool) -> attempt.Planner:
    """The planner above, with a `recover` hook on its attempts."""
    base = planner(stream=stream)

    def plan(cand: Candidate) -> attempt.Attempt:
        planned = base(cand)
        planned.recover = hook
        return planned

    return plan


def with_image(plan: attempt.Planner) -> attempt.Planner:
    """`plan`, with an image on the first message of every attempt's body."""

    def planned(cand: Candidate) -> attempt.Attempt:
        made = plan(cand)
        data = json.loads(made.body)
        data["messages"][0]["images"] = ["aGk="]
        made.body = json.dumps(data).encode()
        return made

    return planned


@pytest.mark.asyncio
@pytest.mark.django_db
@pytest.mark.parametrize("stream", [False, True])
async def test_a_retry_on_the_same_server_keeps_the_one_slot_and_gives_it_back(
    stream, mode, fakes: Callable[..., ThreadedFake], monkeypatch
):
    # An Ollama server without vision refuses the image (HTTP 500); the hook sends the request
    # without it, as the image retry does, and the reply carries the hook's header.
    fake = fakes(models=[MODEL], vision=False, tokens=2)
    use_candidates(monkeypatch, candidate(fake.url, limit=1))
    plain = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream})

    def hook(_: attempt.Attempt, status: int, body: bytes) -> attempt.Retry | None:
        return attempt.Retry(plain.encode(), {"X-Test": "retried"}) if status == 500 else None

    plan = with_image(recovering(hook, stream=stream))
    for _ in range(3):  # with limit 1, a leaked slot would make the second wait and fail
        response = await asyncio.wait_for(forward(plan), 5)
        assert response.status_code == 200 and response["X-Test"] == "retried"
        if isinstance(response, proxy.ProxyStreamingResponse):
            assert sum(board.active().values()) == 1
            await response.finish()
    assert fake.stats.snapshot()["requests"]["/api/chat"] == 6  # each refused once, then served
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_refusal_passes_to_the_next_server_and_the_last_one_s_error_is_raised(
    mode, fakes: Callable[..., ThreadedFake], monkeypatch
):
    refusing = fakes(models=[MODEL], vision=False)
    serving = fakes(models=[MODEL])
    no = ApiError(501, "nobody serves this", code="not_here")

    def hook(_: attempt.Attempt, status: int, body: bytes) -> attempt.Refuse | None:
        return attempt.Refuse(no) if status == 500 else None

    use_candidates(
        monkeypatch, candidate(refusing.url, limit=1), candidate(serving.url, limit=1, ep_id=EP_ID + 1)
    )
    for _ in range(3):
        response = await asyncio.wait_for(forward(with_image(recovering(hook, stream=False))), 5)
        assert response.status_code == 200
    use_candidates(monkeypatch, candidate(refusing.url, limit=1))
    with pytest.raises(ApiError) as caught:
        await forward(with_image(recovering(hook, stream=False)))
    assert caught.value is no
    assert not breakers.is_open(EP_ID)  # a refusal is no evidence against the server
    await settled()
