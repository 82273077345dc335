"""The fleet's gauges for /metrics (routing/status/gauges.py): prompt-cache affinity's families."""

from __future__ import annotations

import pytest

from routing.engine.affinity import Affinity
from routing.engine.board import board
from routing.engine.selection import TieredLeastBusy
from routing.status.gauges import fleet_gauges


@pytest.mark.django_db
def test_affinity_choices_and_memory_size_are_exported_when_affinity_is_on() -> None:
    before = board.strategy
    strategy = Affinity(TieredLeastBusy(), wait=0)
    strategy.counts["kept"] = 7
    strategy.memory.put("m\x00k", 1, now=0)
    board.use(strategy)
    try:
        families = {f.name: f for f in fleet_gauges.collect()}
        choices = families["router_affinity_choices"].samples
        assert [s.value for s in choices if s.labels == {"outcome": "kept"}] == [7]
        assert families["router_affinity_remembered"].samples[0].value == 1
        board.use(TieredLeastBusy())
        names = {f.name for f in fleet_gauges.collect()}
        assert "router_affinity_choices" not in names and "router_in_flight" in names
    finally:
        board.use(before)
