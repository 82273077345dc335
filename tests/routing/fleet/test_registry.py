"""The endpoint registry (routing/fleet/registry.py): one database read for any number of
concurrent callers, a reload after `invalidate` (the generation bump), the last copy kept while
the database is away (but no copy invented before the first read), and what a reload changes
elsewhere: the board's limits and the caches of a changed endpoint."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async

from routing.engine.board import board
from routing.fleet import caches
from routing.fleet import registry as registry_module
from routing.fleet.candidates import Candidate
from routing.fleet.probes import EMPTY
from routing.fleet.registry import EndpointInfo, Registry, registry
from routing.models import Endpoint
from tests.routing.fleet.factories import endpoint_info

pytestmark = [pytest.mark.django_db(transaction=True)]


class Database:
    """Stands in for `load_endpoints`: counts reads, can be slow or away."""

    def __init__(self, *rows: EndpointInfo) -> None:
        self.rows = rows
        self.reads = 0
        self.away = False
        self.delay = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> tuple[EndpointInfo, ...]:
        with self._lock:
            self.reads += 1
        time.sleep(self.delay)
        if self.away:
            raise ConnectionError("database is away")
        return self.rows


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    db = Database(endpoint_info(1), endpoint_info(2, enabled=False))
    monkeypatch.setattr(registry_module, "load_endpoints", db)
    yield db


@pytest.mark.asyncio
async def test_concurrent_callers_share_one_read(database: Database) -> None:
    reg = Registry()
    database.delay = 0.05
    results = await asyncio.gather(*(reg.all() for _ in range(20)))
    assert database.reads == 1
    assert all(r == (endpoint_info(1), endpoint_info(2, enabled=False)) for r in results)
    assert await reg.enabled() == (endpoint_info(1),)
    assert database.reads == 1  # fresh: no second read


@pytest.mark.asyncio
async def test_invalidate_makes_the_next_call_read_again(database: Database) -> None:
    reg = Registry()
    await reg.all()
    database.rows = (endpoint_info(1, limit=3),)
    assert await reg.all() != database.rows  # still the fresh copy
    reg.invalidate()
    assert await reg.all() == (endpoint_info(1, limit=3),)
    assert database.reads == 2
    assert reg.cached() == (endpoint_info(1, limit=3),)


@pytest.mark.asyncio
async def test_the_last_copy_is_kept_while_the_database_is_away(database: Database) -> None:
    reg = Registry()
    first = await reg.all()
    database.away = True
    reg.invalidate()
    assert await reg.all() == first  # routing goes on with what it had
    assert database.reads == 2


@pytest.mark.asyncio
async def test_without_any_copy_a_database_outage_is_an_error(database: Database) -> None:
    database.away = True
    with pytest.raises(ConnectionError):
        await Registry().all()


@pytest.mark.asyncio
async def test_a_reload_sets_the_boards_limits_and_drops_a_changed_endpoints_caches() -> None:
    registry.clear()
    board.clear()
    caches.clear_all()
    try:
        ep = await sync_to_async(Endpoint.objects.create)(
            name="gpu", url="http://gpu:11434", max_concurrent_connections=1
        )
        other = await sync_to_async(Endpoint.objects.create)(name="cpu", url="http://cpu:11434")
        (gpu, cpu) = await registry.all()
        caches.loaded.put(gpu.id, EMPTY)
        caches.loaded.put(cpu.id, EMPTY)
        stale = Candidate(gpu, "m:latest", True)  # looked up when the limit was 1
        held = board.try_acquire("m:latest", [stale])
        assert held is not None and board.try_acquire("m:latest", [stale]) is None
        await sync_to_async(Endpoint.objects.filter(id=ep.id).update)(max_concurrent_connections=2)
        registry.invalidate()
        await registry.all()
        assert board.try_acquire("m:latest", [stale]) is not None  # the board follows the registry
        assert caches.loaded.peek(gpu.id) is None  # changed: its cached state is gone
        assert caches.loaded.peek(other.id) is EMPTY  # unchanged: kept
    finally:
        registry.clear()
        board.clear()
        caches.clear_all()
