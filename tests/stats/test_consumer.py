"""The live usage websocket (/ws/usage/), through the real ASGI application.

In-process tests drive `nomyo_site.asgi.application` (origin validator, session auth,
URL router, consumer) with channels' WebsocketCommunicator and the in-memory channel
layer; usage changes are made on the real board and recorder. The last test runs the
whole router as a separate process and watches a proxied request with a websocket client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import pytest_asyncio
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from routing.auth.principal import ANONYMOUS
from routing.engine.accounting import Counts
from routing.engine.board import Lease, board
from routing.fleet import caches
from routing.fleet.candidates import Candidate
from routing.fleet.registry import EndpointInfo, registry
from routing.server.lifecycle import lifecycle
from routing.upstream import client
from stats import publisher as publisher_module
from stats.publisher import Subscriber, publisher
from stats.recorder import recorder
from stats.types import UsagePart
from tests.stats.live import (
    UsageSocket,
    active_of,
    chat,
    cookie_header,
    endpoint_row,
    prompt_tokens,
    staff_session,
    tokens_of,
)

MODEL = "llama3:latest"
HOST = b"127.0.0.1"
ORIGIN = b"http://127.0.0.1"

Snapshot = dict[str, Any]


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture
def gpu(fakes, endpoint) -> Any:
    """One registered endpoint (a fake Ollama server that answers its probes)."""
    fake = fakes(kind="ollama", models=[MODEL, "qwen2:7b"], loaded=[MODEL])
    return endpoint(fake.url, name="gpu-1", max_concurrent_connections=1000)


@pytest.fixture
def staff(transactional_db: None) -> str:
    return staff_session("ops")


@pytest.fixture
def plain_user(transactional_db: None) -> str:
    return staff_session("visitor", staff=False)


@pytest_asyncio.fixture
async def live(transactional_db: None, gpu: Any) -> AsyncIterator[EndpointInfo]:
    """Clean in-process state, the router's background tasks running in this test's loop
    (as the first websocket would start them), and the endpoint as the registry sees it."""
    layer = get_channel_layer()
    await layer.flush()
    board.clear()
    recorder.clear()
    caches.clear_all()
    registry.clear()
    lifecycle.reset_for_tests()
    before = publisher.published
    lifecycle.ensure_started()
    deadline = time.monotonic() + 10
    while publisher.published == before:  # the publisher loop runs and has published once
        assert time.monotonic() < deadline, "the publisher did not start"
        await asyncio.sleep(0.02)
    while caches.advertised.peek(gpu.id) is None:  # and the fleet upkeep has probed the endpoint
        assert time.monotonic() < deadline, "the endpoint was never probed"
        await asyncio.sleep(0.02)
    (info,) = [ep for ep in await registry.all() if ep.id == gpu.id]
    yield info
    # Wait for a flush that may be running in a worker thread (and write what is left),
    # so no row lands in the database after the test's own clean-up.
    await recorder.flush()
    lifecycle.reset_for_tests()
    await asyncio.sleep(0)
    await client.close_client()
    board.clear()
    recorder.clear()
    caches.clear_all()
    registry.clear()
    await layer.flush()


def headers(session: str | None = None, *, origin: bytes | None = ORIGIN, host: bytes = HOST) -> list[Any]:
    """What a browser on http://127.0.0.1/ sends with its websocket handshake."""
    result = [(b"host", host)]
    if origin is not None:
        result.append((b"origin", origin))
    if session is not None:
        result.append((b"cookie", cookie_header(session).encode()))
    return result


class Sockets:
    """Websocket communicators on the real ASGI application; whatever a test leaves open
    (say, after a failed assertion) is disconnected at teardown."""

    def __init__(self) -> None:
        self.opened: list[WebsocketCommunicator] = []

    def open(self, header_list: list[Any]) -> WebsocketCommunicator:
        from nomyo_site.asgi import application

        comm = WebsocketCommunicator(application, "/ws/usage/", headers=header_list)
        self.opened.append(comm)
        return comm

    async def connected(self, session: str) -> tuple[WebsocketCommunicator, Snapshot]:
        comm = self.open(headers(session))
        ok, _ = await comm.connect(timeout=10)
        assert ok, "a staff user on a same-origin page must be accepted"
        first: Snapshot = await comm.receive_json_from(timeout=5)
        return comm, first

    async def close_all(self) -> None:
        for comm in self.opened:
            if not comm.future.done():
                await comm.disconnect()


@pytest_asyncio.fixture
async def sockets(live: EndpointInfo) -> AsyncIterator[Sockets]:
    opened = Sockets()
    yield opened
    await opened.close_all()


async def next_or_none(comm: WebsocketCommunicator, timeout: float) -> Snapshot | None:
    """The next message, or None after `timeout` s of silence. (A timeout inside
    receive_json_from would cancel the application, so silence is watched for with
    receive_nothing, which only polls the output queue.)"""
    if await comm.receive_nothing(timeout=timeout, interval=0.005):
        return None
    message: Snapshot = await comm.receive_json_from(timeout=1)
    return message


async def wait_for(
    comm: WebsocketCommunicator, predicate: Any, timeout: float = 5.0
) -> tuple[Snapshot, list[Snapshot]]:
    """The first message satisfying `predicate`, and every message received until then."""
    seen: list[Snapshot] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no matching snapshot in {timeout} s; last: {seen[-1] if seen else None}"
        message = await next_or_none(comm, left)
        if message is None:
            continue
        seen.append(message)
        if predicate(message):
            return message, seen


def acquire(info: EndpointInfo, model: str = MODEL) -> Lease:
    lease = board.try_acquire(model, [Candidate(info, model, True)])
    assert lease is not None
    return lease


# -- who may connect -----------------------------------------------------------------
@pytest.mark.asyncio
async def test_an_anonymous_visitor_is_closed(sockets: Sockets, live: EndpointInfo) -> None:
    comm = sockets.open(headers(None))
    ok, _ = await comm.connect(timeout=5)
    assert not ok
    assert await comm.receive_nothing(timeout=0.3)  # no snapshot leaked before the close
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_logged_in_user_who_is_not_staff_is_closed(
    sockets: Sockets, live: EndpointInfo, plain_user: str
) -> None:
    comm = sockets.open(headers(plain_user))
    ok, _ = await comm.connect(timeout=5)
    assert not ok
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_staff_user_gets_the_current_snapshot_on_connect(
    sockets: Sockets, live: EndpointInfo, staff: str
) -> None:
    lease = acquire(live)  # something to see
    try:
        comm, first = await sockets.connected(staff)
        assert first["type"] == "usage.snapshot"
        assert first["processes"] == 1
        row = endpoint_row(first, "gpu-1")
        assert row["url"] == live.url and row["limit"] == 1000 and row["enabled"] is True
        assert row["active"] == 1
        assert MODEL in row["models"] and "qwen2:7b" in row["models"]
        assert first["active"] == [{"endpoint": "gpu-1", "endpoint_id": live.id, "model": MODEL, "count": 1}]
        assert first["queued"] == {}
        assert "token_parts" not in first and "api_key" not in str(first)  # internals and secrets stay home
        # Connecting publishes the state to every page; this page does not get it twice.
        # (A later snapshot may come: the router's background upkeep refreshes endpoint
        # state right after start-up. It is then a new publication, not the same one.)
        second = await next_or_none(comm, 1.0)
        assert second is None or second["taken_at"] != first["taken_at"]
        await comm.disconnect()
    finally:
        lease.release()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("origin", "host"),
    [
        (b"http://evil.example", HOST),  # not an allowed host: the origin validator refuses it
        (b"null", HOST),  # sandboxed frames and file:// pages
        (b"http://127.0.0.1:9999", b"127.0.0.1:8000"),  # allowed host, another site (port)
        (None, HOST),  # no Origin at all
    ],
    ids=["foreign-host", "null", "other-port", "missing"],
)
async def test_a_bad_origin_is_rejected(
    sockets: Sockets, live: EndpointInfo, staff: str, origin: bytes | None, host: bytes
) -> None:
    comm = sockets.open(headers(staff, origin=origin, host=host))
    ok, _ = await comm.connect(timeout=5)
    assert not ok, "even with a valid staff session"
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()


@pytest.mark.asyncio
async def test_the_same_origin_with_its_port_is_accepted(
    sockets: Sockets, live: EndpointInfo, staff: str
) -> None:
    comm = sockets.open(headers(staff, origin=b"http://127.0.0.1:8000", host=b"127.0.0.1:8000"))
    ok, _ = await comm.connect(timeout=5)
    assert ok
    assert (await comm.receive_json_from(timeout=5))["type"] == "usage.snapshot"
    await comm.disconnect()


# -- what it sends -------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_change_in_usage_sends_a_new_snapshot(
    sockets: Sockets, live: EndpointInfo, staff: str
) -> None:
    comm, first = await sockets.connected(staff)
    assert active_of(first, "gpu-1") == 0

    lease = acquire(live)
    snap, _ = await wait_for(comm, lambda s: active_of(s, "gpu-1") == 1)
    assert snap["active"] == [{"endpoint": "gpu-1", "endpoint_id": live.id, "model": MODEL, "count": 1}]

    second = acquire(live, "qwen2:7b")
    snap, _ = await wait_for(comm, lambda s: active_of(s, "gpu-1") == 2)
    assert {r["model"]: r["count"] for r in snap["active"]} == {MODEL: 1, "qwen2:7b": 1}

    lease.release()
    second.release()
    snap, _ = await wait_for(comm, lambda s: active_of(s, "gpu-1") == 0)
    assert snap["active"] == []

    recorder.record(ANONYMOUS, live.url, MODEL, Counts(prompt=12, completion=30))
    snap, _ = await wait_for(comm, lambda s: tokens_of(s, live.url, MODEL) != (0, 0, 0))
    assert tokens_of(snap, live.url, MODEL) == (12, 30, 42)
    recorder.record(ANONYMOUS, live.url, MODEL, Counts(prompt=3, completion=4))
    snap, _ = await wait_for(comm, lambda s: tokens_of(s, live.url, MODEL)[2] != 42)
    assert tokens_of(snap, live.url, MODEL) == (15, 34, 49)
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_burst_of_changes_is_coalesced_and_ends_in_the_final_state(
    sockets: Sockets, live: EndpointInfo, staff: str
) -> None:
    comm, _ = await sockets.connected(staff)
    held: list[Lease] = []
    started = time.monotonic()
    for i in range(200):  # 200 changes in about 0.5 s
        if i % 3 == 2:
            held.pop().release()
        else:
            held.append(acquire(live))
        await asyncio.sleep(0.0025)
    burst = time.monotonic() - started
    final = len(held)
    assert final == 68
    messages: list[Snapshot] = []
    while (message := await next_or_none(comm, 0.5)) is not None:  # until the page goes quiet
        messages.append(message)
    elapsed = time.monotonic() - started
    assert messages, "the burst must be shown"
    # At most 10 snapshots a second (plus the one already on its way when it began).
    assert len(messages) <= elapsed * 10 + 2, (len(messages), elapsed, burst)
    assert len(messages) < 20, "200 changes must not mean 200 messages"
    assert active_of(messages[-1], "gpu-1") == final
    assert messages[-1]["active"][0]["count"] == final
    assert await comm.receive_nothing(timeout=0.5)  # nothing left over after the final state
    for lease in held:
        lease.release()
    await wait_for(comm, lambda s: active_of(s, "gpu-1") == 0)
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_stuck_subscriber_stays_bounded_and_does_not_hold_up_the_pages(
    sockets: Sockets, live: EndpointInfo, staff: str
) -> None:
    comm, _ = await sockets.connected(staff)
    stuck = publisher.subscribe()  # an SSE reader that never reads
    try:
        published_before = publisher.published
        held: list[Lease] = []
        for i in range(1000):  # 1000 notifications over about 2 s
            if i % 2 == 0:
                held.append(acquire(live))
            else:
                recorder.record(ANONYMOUS, live.url, MODEL, Counts(prompt=1, completion=1))
            if i % 10 == 0:
                await asyncio.sleep(0.02)
        publishes = publisher.published - published_before
        assert publishes > publisher_module.SUBSCRIBER_BUFFER, "enough snapshots to overflow the buffer"
        # The page still gets the final state, promptly.
        snap, _ = await wait_for(
            comm, lambda s: active_of(s, "gpu-1") == 500 and tokens_of(s, live.url, MODEL)[2] == 1000, 3.0
        )
        assert snap["active"][0]["count"] == 500
        # The stuck reader holds only the newest SUBSCRIBER_BUFFER snapshots, oldest dropped.
        buffered = list(stuck._items)
        assert len(buffered) == publisher_module.SUBSCRIBER_BUFFER
        assert stuck.dropped == publisher.published - published_before - len(buffered)
        assert [s["taken_at"] for s in buffered] == sorted(s["taken_at"] for s in buffered)
        await asyncio.sleep(0.3)
        newest = stuck._items[-1]
        assert sum(r["count"] for r in newest["active"]) == 500
        for lease in held:
            lease.release()
    finally:
        publisher.unsubscribe(stuck)
    await comm.disconnect()


def test_a_subscriber_buffer_drops_the_oldest_snapshots() -> None:
    sub = Subscriber(size=8)
    for i in range(1000):
        sub.offer(cast(UsagePart, {"taken_at": float(i)}))
    assert [s["taken_at"] for s in sub._items] == list(range(992, 1000))
    assert sub.dropped == 992


# -- a real router process -----------------------------------------------------------
def test_a_proxied_request_shows_as_active_then_as_tokens(fakes, endpoint, router) -> None:
    """The router as a separate daphne process; the websocket client is the `websockets`
    library with a staff session cookie and the page's Origin."""
    slow = fakes(kind="ollama", models=[MODEL], tokens=12, delay=0.15)  # about 1.8 s per reply
    endpoint(slow.url, name="gpu-slow", max_concurrent_connections=2)
    session = staff_session("ops")
    server = router()
    ws = UsageSocket(server.url, session)
    try:
        first = ws.next(timeout=10)
        assert first["processes"] == 1
        assert active_of(first, "gpu-slow") == 0
        assert tokens_of(first, slow.url, MODEL) == (0, 0, 0)

        reply = chat(server.url, "llama3", "why is the sky blue")
        busy = ws.wait_for(lambda s: active_of(s, "gpu-slow") == 1, timeout=10)
        assert [(r["endpoint"], r["model"], r["count"]) for r in busy["active"]] == [("gpu-slow", MODEL, 1)]
        assert tokens_of(busy, slow.url, MODEL) == (0, 0, 0)  # counted when the reply ends

        reply.join()
        done = ws.wait_for(lambda s: tokens_of(s, slow.url, MODEL) != (0, 0, 0), timeout=10)
        expected_in = prompt_tokens("why is the sky blue")
        assert tokens_of(done, slow.url, MODEL) == (expected_in, 12, expected_in + 12)
        assert active_of(done, "gpu-slow") == 0
        assert slow.stats.snapshot()["completed"] == 1
    finally:
        ws.close()
