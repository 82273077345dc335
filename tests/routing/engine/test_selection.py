"""The selection seam (routing/engine/selection.py) and the board's calls into it
(routing/engine/board.py): the base rule as a strategy, its order, the cap, unmetered choices,
a custom strategy on every path (new request, re-check, a slot handed to a waiter), and the
inputs next strategies read (the affinity key, time to first byte)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.engine.board import Board
from routing.engine.selection import Ask, Load, TieredLeastBusy
from routing.fleet.candidates import Candidate
from tests.routing.fleet.factories import MODEL, candidate

RULE = TieredLeastBusy()


cand = partial(candidate, limit=4)  # four slots unless told


def load(
    active: dict[tuple[int, str], int] | None = None,
    per_endpoint: dict[int, int] | None = None,
    limits: dict[int, int] | None = None,
) -> Load:
    return Load(active or {}, per_endpoint or {}, limits or {}, {})


def pick(cands: Sequence[Candidate], lo: Load, *, metered: bool = True) -> int | None:
    chosen = RULE.pick(Ask(MODEL), cands, lo, metered=metered)
    return None if chosen is None else chosen.endpoint.id


def test_the_rule_orders_loaded_then_least_busy_for_the_model_then_least_busy_overall() -> None:
    # loaded beats busier-for-the-model and busier-overall
    lo = load(active={(2, MODEL): 3}, per_endpoint={2: 3})
    assert pick([cand(1), cand(2, loaded=True)], lo) == 2
    # among loaded alike: least busy for the model, even if busier overall
    lo = load(active={(1, MODEL): 1}, per_endpoint={1: 1, 2: 3})
    assert pick([cand(1), cand(2)], lo) == 2
    # tied for the model: least busy overall
    lo = load(active={(1, MODEL): 1, (2, MODEL): 1}, per_endpoint={1: 2, 2: 1})
    assert pick([cand(1), cand(2)], lo) == 2


def test_ties_are_broken_at_random() -> None:
    seen = {pick([cand(1), cand(2), cand(3)], load()) for _ in range(200)}
    assert seen == {1, 2, 3}


@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 6), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_metered_never_picks_a_full_endpoint_and_returns_none_only_when_all_are_full(
    rows: list[tuple[int, int, int, bool]],
) -> None:
    """Any counters and limits (the board's current limit overriding the candidate's)."""
    cands = [cand(i + 1, limit=own, loaded=loaded) for i, (own, _, _, loaded) in enumerate(rows)]
    limits = {i + 1: cur for i, (_, cur, _, _) in enumerate(rows) if i % 2 == 0}
    active = {(i + 1, MODEL): held for i, (_, _, held, _) in enumerate(rows)}
    lo = load(active=active, limits=limits)
    chosen = RULE.pick(Ask(MODEL), cands, lo, metered=True)
    free = [c for c in cands if lo.has_free_slot(c, MODEL)]
    if chosen is None:
        assert not free
    else:
        assert chosen in free
        # nothing free ranks before it: a loaded free candidate wins over any unloaded one
        assert chosen.loaded or not any(c.loaded for c in free)
    # unmetered ignores limits: always a candidate
    assert RULE.pick(Ask(MODEL), cands, lo, metered=False) in cands


def test_unmetered_returns_none_only_without_candidates() -> None:
    assert RULE.pick(Ask(MODEL), [], load(), metered=False) is None
    assert pick([cand(1, limit=0)], load(), metered=False) == 1


class Recording:
    """A custom strategy: always the last candidate with a free slot; records what it saw."""

    name = "last-free"

    def __init__(self) -> None:
        self.asks: list[Ask] = []
        self.metered: list[bool] = []

    def pick(
        self, ask: Ask, candidates: Sequence[Candidate], load: Load, *, metered: bool
    ) -> Candidate | None:
        self.asks.append(ask)
        self.metered.append(metered)
        free = [c for c in candidates if not metered or load.has_free_slot(c, ask.model)]
        return free[-1] if free else None


def test_the_board_selects_with_the_strategy_it_is_given() -> None:
    strategy = Recording()
    board = Board(strategy)
    assert board.strategy is strategy
    lease = board.try_acquire(MODEL, [cand(1, loaded=True), cand(2)], affinity="conv-7")
    assert lease is not None and lease.endpoint.id == 2  # the base rule would take the loaded one
    assert strategy.asks[-1].affinity == "conv-7" and strategy.metered[-1] is True
    shown = board.unmetered(MODEL, [cand(1, loaded=True), cand(3)])
    assert shown.endpoint.id == 3 and strategy.metered[-1] is False
    assert board.active() == {(2, MODEL): 1}  # unmetered took no slot
    board.use(RULE)
    assert board.strategy is RULE


def test_unmetered_uses_the_same_rule_as_metered() -> None:
    """Among candidates loaded alike, the one least busy for the model wins (the old copy of the
    rule in `unmetered` looked only at the endpoint's total)."""
    board = Board()
    held = board.try_acquire(MODEL, [cand(1, limit=1)])
    other = board.try_acquire("o:latest", [candidate(2, limit=4, model="o:latest")])
    other2 = board.try_acquire("o:latest", [candidate(2, limit=4, model="o:latest")])
    assert held is not None and other is not None and other2 is not None
    for _ in range(20):  # ep1: 1 for the model, 1 overall; ep2: 0 for the model, 2 overall
        assert board.unmetered(MODEL, [cand(1), cand(2)]).endpoint.id == 2
    with pytest.raises(ValueError):
        board.unmetered(MODEL, [])


@pytest.mark.asyncio
async def test_a_slot_handed_to_a_waiter_is_chosen_by_the_strategy_with_the_waiters_ask() -> None:
    strategy = Recording()
    board = Board(strategy)
    held = board.try_acquire(MODEL, [cand(1, limit=1)])
    assert held is not None
    waiter = asyncio.create_task(
        board.acquire(MODEL, [cand(1, limit=1), cand(2, limit=0)], timeout=5, queue_max=10, affinity="conv-9")
    )
    await asyncio.sleep(0.01)
    assert board.queued() == {MODEL: 1}
    calls = len(strategy.asks)
    held.release()  # the slot goes to the waiter inside release, picked by the strategy
    lease = await asyncio.wait_for(waiter, 1)
    assert lease.endpoint.id == 1
    assert len(strategy.asks) > calls and strategy.asks[-1].affinity == "conv-9"
    first_ask = strategy.asks[calls - 1]
    assert strategy.asks[-1] is first_ask  # the same request: its first asking time is kept
    lease.release()
    assert board.active() == {}


def test_time_to_first_byte_is_averaged_per_endpoint_and_model_on_release() -> None:
    board = Board()
    seen: list[Load] = []

    class Peek(TieredLeastBusy):
        def pick(
            self, ask: Ask, candidates: Sequence[Candidate], load: Load, *, metered: bool
        ) -> Candidate | None:
            seen.append(load)
            return super().pick(ask, candidates, load, metered=metered)

    board.use(Peek())
    for seconds in (1.0, 2.0, None):
        lease = board.try_acquire(MODEL, [cand(1)])
        assert lease is not None
        lease.first_byte = seconds  # None: no reply head came (a failure), nothing averaged
        lease.release()
    assert board.first_byte() == {(1, MODEL): pytest.approx(1.2)}  # 1.0, then 1.0 + 0.2 * (2.0 - 1.0)
    assert seen[-1].first_byte == {(1, MODEL): pytest.approx(1.2)}  # what a latency-aware strategy reads


def test_limits_changed_by_the_registry_are_seen_by_the_strategy() -> None:
    board = Board()
    board.set_limits({1: 0})
    assert board.try_acquire(MODEL, [cand(1, limit=4)]) is None
    board.set_limits({1: 2})
    assert board.try_acquire(MODEL, [cand(1, limit=4)]) is not None
    board.clear()
    assert board.try_acquire(MODEL, [cand(1, limit=1)]) is not None  # back to the candidate's own
