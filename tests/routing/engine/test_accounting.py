"""routing/engine/accounting: every sink gets each finished request once, in install order,
with its principal; a raising sink is logged and does not stop the next; install is
idempotent; the forwarding path reports a reply's counts, or an incomplete request, once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.fake_backend import ThreadedFake
from routing.auth.principal import ANONYMOUS, OPERATOR, Principal
from routing.engine import proxy
from routing.engine.accounting import Counts, MetricsSink, Sinks
from routing.engine.attempt import Attempt
from routing.engine.board import board
from routing.fleet import candidates
from routing.fleet.breaker import breakers
from routing.fleet.candidates import Candidate
from routing.fleet.registry import EndpointInfo
from routing.observability import metrics
from routing.upstream import client
from tests.routing.engine.attempts import ollama_chat
from tests.routing.engine.sinks import install_only
from tests.routing.fleet.factories import endpoint_info

MODEL = "llama3:latest"


class Book:
    def __init__(self, name: str, log: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.log = log

    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Counts, *, requested: str = ""
    ) -> None:
        self.log.append((self.name, "record", principal, endpoint, model, counts))

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        self.log.append((self.name, "incomplete", principal, endpoint, model))


class Broken:
    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Counts, *, requested: str = ""
    ) -> None:
        raise RuntimeError("sink down")

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        raise RuntimeError("sink down")


def test_fan_out_in_install_order_with_the_principal():
    log: list[tuple[Any, ...]] = []
    sinks = Sinks()
    first, second = Book("first", log), Book("second", log)
    sinks.install(first)
    sinks.install(second)
    sinks.record(OPERATOR, "http://a", "m", Counts(3, 4))
    sinks.incomplete(ANONYMOUS, "http://b", "n")
    assert log == [
        ("first", "record", OPERATOR, "http://a", "m", Counts(3, 4)),
        ("second", "record", OPERATOR, "http://a", "m", Counts(3, 4)),
        ("first", "incomplete", ANONYMOUS, "http://b", "n"),
        ("second", "incomplete", ANONYMOUS, "http://b", "n"),
    ]


def test_a_raising_sink_is_logged_and_the_next_still_runs(caplog: pytest.LogCaptureFixture):
    log: list[tuple[Any, ...]] = []
    sinks = Sinks()
    sinks.install(Broken())
    sinks.install(Book("after", log))
    with caplog.at_level(logging.ERROR, logger="routing.accounting"):
        sinks.record(ANONYMOUS, "http://a", "m", Counts(1, 1))
        sinks.incomplete(ANONYMOUS, "http://a", "m")
    assert [entry[:2] for entry in log] == [("after", "record"), ("after", "incomplete")]
    assert sum("sink down" in (r.exc_text or "") for r in caplog.records) == 2


def test_install_is_idempotent_and_uninstall_removes():
    log: list[tuple[Any, ...]] = []
    sinks = Sinks()
    book = Book("b", log)
    sinks.install(book)
    sinks.install(book)
    assert sinks.installed == (book,)
    sinks.record(ANONYMOUS, "u", "m", Counts(1, 2))
    assert len(log) == 1
    sinks.uninstall(book)
    sinks.record(ANONYMOUS, "u", "m", Counts(1, 2))
    assert len(log) == 1 and sinks.installed == ()


def test_the_metrics_sink_counts_tokens_and_nothing_for_an_incomplete_request(monkeypatch):
    calls: list[tuple[str, str, int, int]] = []
    monkeypatch.setattr(metrics, "count_tokens", lambda *args: calls.append(args))
    MetricsSink().record(ANONYMOUS, "http://sink-test", "m:latest", Counts(5, 7))
    MetricsSink().incomplete(ANONYMOUS, "http://sink-test", "m:latest")
    assert calls == [("http://sink-test", "m:latest", 5, 7)]


# -- the forwarding path reports to the sinks (in-process, a fake backend on loopback) ---------
@pytest.fixture
def book(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    """Only a recording sink is installed while the test runs."""
    log: list[tuple[Any, ...]] = []
    install_only(monkeypatch, Book("book", log))
    board.clear()
    breakers.forget()
    yield log
    board.clear()
    breakers.forget()


def use(monkeypatch: pytest.MonkeyPatch, url: str) -> EndpointInfo:
    ep = endpoint_info(9_101, url=url, limit=2)

    async def lookup(model: str) -> candidates.Lookup:
        return candidates.Lookup([Candidate(ep, MODEL, True)], reachable=1)

    monkeypatch.setattr(candidates, "candidates_for", lookup)
    return ep


def plan(stream: bool, *, counted: bool = True) -> Callable[[Candidate], Attempt]:
    def build(cand: Candidate) -> Attempt:
        return ollama_chat(cand, MODEL, stream=stream, counted=counted)

    return build


@pytest.mark.asyncio
@pytest.mark.django_db
@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_with_counts_is_recorded_once_with_the_principal(
    stream: bool, book: list[tuple[Any, ...]], fakes: Callable[..., ThreadedFake], monkeypatch
):
    fake = fakes(models=[MODEL], tokens=3)
    ep = use(monkeypatch, fake.url)
    response = await proxy.forward("/api/chat", model=MODEL, plan=plan(stream), principal=OPERATOR)
    if isinstance(response, proxy.ProxyStreamingResponse):
        async for _ in response.chunks:
            pass
        await response.finish()
    assert len(book) == 1
    _, kind, principal, endpoint, model = book[0][:5]
    assert (kind, principal, endpoint, model) == ("record", OPERATOR, ep.url, "llama3:latest")
    assert book[0][5].completion > 0
    await client.close_client()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_a_stream_cut_before_its_end_is_incomplete(
    book: list[tuple[Any, ...]], fakes: Callable[..., ThreadedFake], monkeypatch
):
    fake = fakes(models=[MODEL], tokens=50, delay=0.05)
    use(monkeypatch, fake.url)
    response = await proxy.forward("/api/chat", model=MODEL, plan=plan(True), principal=ANONYMOUS)
    assert isinstance(response, proxy.ProxyStreamingResponse)
    await response.finish()  # the client went away before reading
    assert [entry[1:3] for entry in book] == [("incomplete", ANONYMOUS)]
    await client.close_client()


@pytest.mark.asyncio
@pytest.mark.django_db
async def test_counted_false_records_nothing(
    book: list[tuple[Any, ...]], fakes: Callable[..., ThreadedFake], monkeypatch
):
    fake = fakes(models=[MODEL], tokens=3)
    use(monkeypatch, fake.url)
    response = await proxy.forward(
        "/api/chat", model=MODEL, plan=plan(False, counted=False), principal=ANONYMOUS
    )
    assert response.status_code == 200
    assert book == []
    await client.close_client()
