"""The fleet's health (routing/fleet/health.py), in-process with probe replies from an httpx
MockTransport: strong evidence opens the breaker at once, weak evidence only after
ROUTER_BREAKER_FAILURES; an open endpoint's loaded list is dropped and it is re-probed in the
background until a probe closes it (open -> half_open -> closed); a probe that keeps failing
keeps it open; a disabled endpoint stops being re-probed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from asgiref.sync import sync_to_async

from routing.fleet import caches, health
from routing.fleet.breaker import State, breakers
from routing.fleet.probes import EMPTY
from routing.fleet.registry import EndpointInfo, registry
from routing.models import Endpoint
from routing.upstream import client as upstream_client

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def clean(settings) -> Iterator[None]:
    settings.ROUTER_FAILING_TTL = 2.0  # re-probed every 0.5 s
    settings.ROUTER_BREAKER_FAILURES = 3

    def reset() -> None:
        registry.clear()
        caches.clear_all()
        breakers.forget()

    reset()
    yield
    reset()
    upstream_client.set_transport_factory(None)


class Server:
    """The probe replies of one endpoint; `up` switches between answering and refusing."""

    def __init__(self) -> None:
        self.up = True
        self.probes = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.probes += 1
        if not self.up:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"models": [{"name": "llama3"}]})


async def endpoint(server: Server) -> EndpointInfo:
    await sync_to_async(Endpoint.objects.create)(name="gpu", url="http://gpu:11434")
    upstream_client.set_transport_factory(lambda: httpx.MockTransport(server))
    (ep,) = await registry.all()
    return ep


async def wait_for_state(ep: EndpointInfo, state: State, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while breakers.view(ep.id).state is not state:
            await asyncio.sleep(0.05)


async def stop_reprobe(ep: EndpointInfo) -> None:
    task = health._reprobes.pop(ep.id, None)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await upstream_client.close_client()


@pytest.mark.asyncio
async def test_weak_evidence_opens_the_breaker_only_after_the_threshold_strong_at_once() -> None:
    ep = await endpoint(Server())
    for _ in range(2):
        health.server_failed(ep, "HTTP 500", strong=False)
    assert breakers.view(ep.id).state is State.CLOSED
    health.server_failed(ep, "HTTP 500", strong=False)  # the third
    assert breakers.view(ep.id).state is State.OPEN
    await stop_reprobe(ep)
    breakers.forget()
    caches.loaded.put(ep.id, EMPTY)
    health.mark_failing(ep, "connection refused")  # strong: at once
    view = breakers.view(ep.id)
    assert view.state is State.OPEN and view.reason == "connection refused" and view.since is not None
    assert caches.loaded.peek(ep.id) is None  # what was loaded there is no longer trusted
    await stop_reprobe(ep)


@pytest.mark.asyncio
async def test_the_reprobe_closes_the_breaker_once_the_server_answers_again() -> None:
    server = Server()
    ep = await endpoint(server)
    server.up = False
    assert await health.advertised_or_none(ep) is None  # the failed probe opens it
    assert breakers.view(ep.id).state is State.OPEN
    await asyncio.sleep(1.2)  # two re-probes, both refused
    assert breakers.view(ep.id).state is State.OPEN and server.probes >= 3
    server.up = True
    await wait_for_state(ep, State.CLOSED)  # through half_open, one probe each
    assert caches.advertised.peek(ep.id) is not None  # the answering probe's models are kept
    assert await health.advertised_or_none(ep) is not None
    task = health._reprobes[ep.id]
    await asyncio.wait_for(task, 1)  # the re-probe ends once closed
    await stop_reprobe(ep)


@pytest.mark.asyncio
async def test_a_disabled_endpoint_is_no_longer_reprobed() -> None:
    server = Server()
    ep = await endpoint(server)
    server.up = False
    health.mark_failing(ep, "connection refused")
    await sync_to_async(Endpoint.objects.filter(id=ep.id).update)(enabled=False)
    registry.invalidate()
    await registry.all()
    task = health._reprobes[ep.id]
    await asyncio.wait_for(task, 2)  # returns at its next turn
    assert server.probes == 0
    await stop_reprobe(ep)
