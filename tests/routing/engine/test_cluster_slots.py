"""Cluster-wide slot claims in Redis (routing/engine/cluster.py)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from routing.engine import cluster as cluster_module
from routing.engine.cluster import ClusterSlots
from tests.integration.test_cluster import _redis_answers

pytestmark = pytest.mark.skipif(not _redis_answers(), reason="no Redis at 127.0.0.1:6379 (CI starts one)")


@pytest.fixture
def slots(settings) -> ClusterSlots:
    settings.REDIS_URL = "redis://127.0.0.1:6379/15"
    return ClusterSlots()


@pytest.mark.asyncio
async def test_it_never_grants_more_claims_than_the_limit(slots: ClusterSlots):
    url, model = f"http://test-{uuid.uuid4().hex}", "m:latest"
    claims = await asyncio.gather(*(slots.claim(url, model, 3) for _ in range(20)))
    granted = [c for c in claims if c]
    assert len(granted) == 3 and slots.held() == 3
    slots.free(granted[0])
    await asyncio.sleep(0.05)
    assert await slots.claim(url, model, 3)


@pytest.mark.asyncio
async def test_it_frees_the_slots_of_a_process_that_died(slots: ClusterSlots, monkeypatch):
    monkeypatch.setattr(cluster_module, "LEASE", 0.3)
    monkeypatch.setattr(cluster_module, "RENEW_EVERY", 60.0)
    url, model = f"http://test-{uuid.uuid4().hex}", "m:latest"
    dead = ClusterSlots()  # claims, then never renews nor frees: a crashed process
    assert await dead.claim(url, model, 1)
    assert await slots.claim(url, model, 1) is None
    await asyncio.sleep(0.4)
    assert await slots.claim(url, model, 1)


@pytest.mark.asyncio
async def test_it_keeps_renewed_claims_alive(slots: ClusterSlots, monkeypatch):
    monkeypatch.setattr(cluster_module, "LEASE", 0.3)
    monkeypatch.setattr(cluster_module, "RENEW_EVERY", 0.1)
    url, model = f"http://test-{uuid.uuid4().hex}", "m:latest"
    holder = ClusterSlots()
    member = await holder.claim(url, model, 1)
    assert member
    await asyncio.sleep(0.6)
    assert await slots.claim(url, model, 1) is None
    holder.free(member)  # the renewer stops once nothing is held
    await asyncio.sleep(0.3)
    assert holder.held() == 0
