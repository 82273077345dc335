"""routing/engine/proxy.forward in-process, against fake backends on loopback ports: what each
kind of upstream answer does to the request, the other candidates, the breaker and the slot.

- a server that did not take the work (refused, 503) -> failover to the next candidate;
- a 4xx -> passed through as it is, no failover, the breaker untouched;
- another complete 5xx -> back to this client alone (no evidence either way, no failover);
- no first byte in time -> 504 naming the server, never resent elsewhere, counted as
  incomplete, weak evidence (the breaker opens when it repeats across requests);
- a server refusing the router's own `stream_options` -> the same request again without it,
  on the same server and slot, and never sent with it again;
and on every one of these paths the slot comes back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from bench.fake_backend import ThreadedFake
from routing.auth.principal import ANONYMOUS
from routing.core.errors import ApiError
from routing.engine import proxy
from routing.engine.attempt import Attempt
from routing.engine.board import board
from routing.fleet import candidates
from routing.fleet.breaker import State, breakers
from routing.fleet.candidates import Candidate
from routing.fleet.refusals import refusals
from routing.fleet.registry import EndpointInfo
from routing.protocols.common.relays import OllamaStream, OpenAIStream, openai_body
from routing.upstream import client
from tests.conftest import free_port
from tests.routing.engine.attempts import ollama_chat
from tests.routing.engine.sinks import Book
from tests.routing.fleet.factories import endpoint_info

MODEL = "llama3:latest"


def endpoint(url: str, ep_id: int, kind: str = "ollama") -> EndpointInfo:
    return endpoint_info(ep_id, url=url, kind=kind)


def use(monkeypatch: pytest.MonkeyPatch, *eps: EndpointInfo) -> None:
    """The candidates, tried in this order: only the first has the model loaded (the
    selection prefers it), so the others are the failover targets."""

    async def lookup(model: str) -> candidates.Lookup:
        found = [Candidate(ep, MODEL, i == 0) for i, ep in enumerate(eps)]
        return candidates.Lookup(found, reachable=len(eps))

    monkeypatch.setattr(candidates, "candidates_for", lookup)


def ollama_plan(cand: Candidate) -> Attempt:
    return ollama_chat(cand, MODEL)


def openai_plan(cand: Candidate) -> Attempt:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    plain = json.dumps(body).encode()
    body["stream_options"] = {"include_usage": True}
    return Attempt(
        url=cand.endpoint.url + "/v1/chat/completions",
        body=json.dumps(body).encode(),
        relay=lambda: OpenAIStream(strip_usage=False),
        read_body=openai_body,
        stream=True,
        headers={"Content-Type": "application/json"},
        fallback_body=lambda: plain,
    )


async def forward(plan: Callable[[Candidate], Attempt]) -> Any:
    return await proxy.forward("/api/chat", model=MODEL, plan=plan, principal=ANONYMOUS)


async def drained(response: Any) -> bytes:
    if isinstance(response, proxy.ProxyStreamingResponse):
        out = b"".join([chunk async for chunk in response.chunks])
        await response.finish()
        return out
    return bytes(response.content)


async def settled() -> None:
    assert board.active() == {}
    assert board.queued_total() == 0
    await client.close_client()


@pytest.mark.asyncio
@pytest.mark.django_db
@pytest.mark.parametrize("first", ["refused", "503"])
async def test_a_server_that_did_not_take_the_work_fails_over(
    first: str, book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    good = fakes(models=[MODEL], tokens=2)
    if first == "refused":
        bad_url = f"http://127.0.0.1:{free_port()}"
        bad = None
    else:
        bad = fakes(models=[MODEL], fault="503")
        bad_url = bad.url
    use(monkeypatch, endpoint(bad_url, 9_201), endpoint(good.url, 9_202))
    response = await forward(ollama_plan)
    assert response.status_code == 200 and response["X-Router-Endpoint"] == "ep9202"
    assert json.loads(await drained(response))["done"] is True
    assert good.stats.total_requests() == 1
    if bad is not None:
        assert bad.stats.total_requests() == 1
        assert breakers.view(9_201).state is State.CLOSED  # one 503: weak evidence
    else:
        assert breakers.is_open(9_201)  # refused: strong evidence, out of rotation at once
    assert book.entries == [("record", good.url, MODEL, "")]  # counted once, on the server that answered
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_4xx_is_passed_through_without_failover(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    locked = fakes(models=[MODEL], api_key="secret")  # our attempt sends no key: 401
    other = fakes(models=[MODEL])
    use(monkeypatch, endpoint(locked.url, 9_211), endpoint(other.url, 9_212))
    response = await forward(ollama_plan)
    assert response.status_code == 401 and response["X-Router-Endpoint"] == "ep9211"
    assert "error" in json.loads(await drained(response))
    assert other.stats.total_requests() == 0
    assert breakers.view(9_211).state is State.CLOSED
    assert book.entries == []  # an error reply carries no counts and is not a counted reply
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_500_goes_back_to_this_client_alone(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch, settings
):
    broken = fakes(models=[MODEL], fault="500")
    other = fakes(models=[MODEL])
    use(monkeypatch, endpoint(broken.url, 9_221), endpoint(other.url, 9_222))
    settings.ROUTER_BREAKER_FAILURES = 2
    for _ in range(4):  # repeated: still about those requests, never about the server
        response = await forward(ollama_plan)
        assert response.status_code == 500 and response["X-Router-Endpoint"] == "ep9221"
    assert other.stats.total_requests() == 0  # it may have run there: not resent
    assert breakers.view(9_221) == breakers.view(-1)  # no evidence recorded: plainly closed
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_no_first_byte_in_time_is_a_504_never_resent(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch, settings
):
    settings.ROUTER_FIRST_BYTE_TIMEOUT = 0.3
    slow = fakes(models=[MODEL], first_byte_delay=3)
    other = fakes(models=[MODEL])
    use(monkeypatch, endpoint(slow.url, 9_231), endpoint(other.url, 9_232))
    settings.ROUTER_BREAKER_FAILURES = 2
    with pytest.raises(ApiError) as caught:
        await forward(ollama_plan)
    assert caught.value.status == 504 and "not resent" in caught.value.message
    assert caught.value.headers == {"X-Router-Endpoint": "ep9231"}
    assert other.stats.total_requests() == 0
    assert breakers.view(9_231).state is State.CLOSED  # once: weak evidence
    assert book.entries == [("incomplete", slow.url, MODEL, "")]
    with pytest.raises(ApiError):  # a second request stalls too: out of rotation
        await forward(ollama_plan)
    assert breakers.view(9_231).state is State.OPEN and other.stats.total_requests() == 0
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_refused_stream_options_is_retried_without_it_on_the_same_slot(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    strict = fakes(kind="openai", models=[MODEL], reject_fields=["stream_options"], tokens=2)
    other = fakes(kind="openai", models=[MODEL])
    use(monkeypatch, endpoint(strict.url, 9_241, "openai"), endpoint(other.url, 9_242, "openai"))
    seen: list[int] = []
    real_acquire = board.acquire

    async def counting_acquire(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        return await real_acquire(*args, **kwargs)

    monkeypatch.setattr(board, "acquire", counting_acquire)
    response = await forward(openai_plan)
    assert response.status_code == 200 and response["X-Router-Endpoint"] == "ep9241"
    assert b"[DONE]" in await drained(response)
    assert len(seen) == 1  # one slot for both sends
    assert strict.stats.total_requests() == 2 and other.stats.total_requests() == 0
    assert 9_241 in refusals
    bodies = strict.stats.bodies_for("/v1/chat/completions")
    assert "stream_options" in bodies[0] and "stream_options" not in bodies[1]
    response = await forward(openai_plan)  # known now: sent without it at once
    await drained(response)
    assert strict.stats.total_requests() == 3
    assert "stream_options" not in strict.stats.bodies_for("/v1/chat/completions")[-1]
    assert breakers.view(9_241).state is State.CLOSED
    await settled()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_every_candidate_failing_is_a_502_with_the_last_reason(book: Book, monkeypatch):
    use(
        monkeypatch,
        endpoint(f"http://127.0.0.1:{free_port()}", 9_251),
        endpoint(f"http://127.0.0.1:{free_port()}", 9_252),
    )
    with pytest.raises(ApiError) as caught:
        await forward(ollama_plan)
    assert caught.value.status == 502 and "connection refused" in caught.value.message
    assert caught.value.headers["X-Router-Endpoint"] in ("ep9251", "ep9252")  # the last one tried
    assert breakers.is_open(9_251) and breakers.is_open(9_252)
    assert book.entries == []
    await settled()


class Breaking(OllamaStream):
    """A relay that cannot translate the second chunk it is fed (a bug, or a shape no server
    should send)."""

    def __init__(self) -> None:
        super().__init__()
        self.fed = 0

    def feed(self, chunk: bytes) -> bytes:
        self.fed += 1
        if self.fed > 1:
            raise TypeError("'int' object is not iterable")
        return super().feed(chunk)


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_relay_that_raises_ends_the_stream_with_an_error_and_gives_the_slot_back(
    book: Book, fakes: Callable[..., ThreadedFake], monkeypatch
):
    # The exception once left the stream: the client's connection stayed open with no end.
    server = fakes(models=[MODEL], tokens=20, delay=0.01)
    use(monkeypatch, endpoint(server.url, 9_231))

    def plan(cand: Candidate) -> Attempt:
        attempt = ollama_plan(cand)
        attempt.body = attempt.body.replace(b'"stream": false', b'"stream": true')
        attempt.stream, attempt.relay = True, Breaking
        return attempt

    response = await forward(plan)
    last = (await drained(response)).strip().splitlines()[-1]
    assert "malformed reply from upstream ep9231" in json.loads(last)["error"]
    assert book.entries == [("incomplete", server.url, MODEL, "")]
    await settled()
