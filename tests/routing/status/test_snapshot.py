"""The snapshot shapes: what routing/status/snapshot.py, stats/snapshot.py, the publisher and
/api/config build has exactly the keys of their TypedDicts (routing/status/types.py,
stats/types.py), and no api key appears in any of them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from routing.auth.principal import ANONYMOUS
from routing.engine.accounting import Counts
from routing.engine.board import board
from routing.fleet import caches
from routing.fleet.breaker import breakers
from routing.fleet.candidates import Candidate
from routing.fleet.registry import registry
from routing.models import Endpoint
from routing.status import snapshot as fleet_snapshot
from routing.status.types import ActiveRow, EndpointState, FleetSnapshot
from stats import api_views
from stats import snapshot as usage_snapshot
from stats.publisher import publisher
from stats.recorder import recorder
from stats.types import ConfigEndpoint, TokenParts, TokenRow, UsagePart, UsageSnapshot

pytestmark = [pytest.mark.django_db(transaction=True)]
SECRET = "sk-snapshot-secret-4711"


@pytest.fixture(autouse=True)
def clean_state() -> Iterator[None]:
    def reset() -> None:
        recorder.clear()
        registry.clear()
        caches.clear_all()
        board.clear()
        breakers.forget()

    reset()
    yield
    reset()


def keys(typed: Any) -> set[str]:
    """Every key of a TypedDict class, required or not."""
    return set(typed.__required_keys__) | set(typed.__optional_keys__)


async def busy_fleet() -> None:
    """Two endpoints (one with an api key and an open breaker), one slot held, tokens counted."""
    ok = await sync_to_async(Endpoint.objects.create)(name="gpu-a", url="http://a:11434", api_key=SECRET)
    down = await sync_to_async(Endpoint.objects.create)(name="gpu-b", url="http://b:11434")
    infos = {ep.id: ep for ep in await registry.all()}
    breakers.failed(down.id, "connection refused", strong=True, name="gpu-b")
    lease = board.try_acquire("llama3:latest", [Candidate(infos[ok.id], "llama3:latest", True)])
    assert lease is not None
    recorder.record(ANONYMOUS, "http://a:11434", "llama3:latest", Counts(prompt=3, completion=4))


@pytest.mark.asyncio
async def test_the_fleet_snapshot_has_exactly_the_typed_keys() -> None:
    await busy_fleet()
    snap = fleet_snapshot.build()
    assert set(snap) == keys(FleetSnapshot)
    assert len(snap["endpoints"]) == 2 and len(snap["active"]) == 1
    for ep in snap["endpoints"]:
        assert set(ep) == keys(EndpointState)
    assert {ep["breaker"] for ep in snap["endpoints"]} == {"closed", "open"}
    assert set(snap["active"][0]) == keys(ActiveRow)
    assert SECRET not in json.dumps(snap)


@pytest.mark.asyncio
async def test_the_usage_snapshot_and_the_published_part_have_exactly_the_typed_keys() -> None:
    await busy_fleet()
    usage = usage_snapshot.build()
    assert set(usage) == keys(UsageSnapshot)
    assert usage["tokens"] and all(set(row) == keys(TokenRow) for row in usage["tokens"])
    part = await publisher.publish_now()
    assert set(part) == keys(UsagePart)
    assert set(part["token_parts"]) == keys(TokenParts)
    assert SECRET not in json.dumps(usage) and SECRET not in json.dumps(part)


@pytest.mark.asyncio
async def test_config_rows_have_the_typed_keys() -> None:
    await busy_fleet()
    for ep in await registry.all():
        row = api_views._endpoint_state(ep, "0.12.3" if ep.name == "gpu-a" else None)
        assert set(ConfigEndpoint.__required_keys__) <= set(row) <= keys(ConfigEndpoint)
        assert SECRET not in json.dumps(row)
