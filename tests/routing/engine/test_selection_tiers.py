"""The base strategy's order (routing/engine/selection.py, `TieredLeastBusy`): tier first,
then loaded, then the weighted share, then the first-byte latency, then random; on its own and
through the board (slots held and released, the queue).

The fleet in these tests: endpoints described by id, tier, weight and limit; "fast" and "slow"
are the board's moving averages of time to first byte for the model there."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.engine.board import Board, Lease
from routing.engine.selection import LATENCY_SLACK, LATENCY_TOLERANCE, Ask, Load, TieredLeastBusy, rank
from routing.fleet.candidates import Candidate
from tests.routing.fleet.factories import MODEL, candidate

RULE = TieredLeastBusy()


cand = partial(candidate, limit=4)  # four slots unless told


def load(
    active: dict[tuple[int, str], int] | None = None,
    per_endpoint: dict[int, int] | None = None,
    first_byte: dict[tuple[int, str], float] | None = None,
) -> Load:
    return Load(active or {}, per_endpoint or {}, {}, first_byte or {})


def pick(cands: Sequence[Candidate], lo: Load | None = None, *, metered: bool = True) -> int | None:
    chosen = RULE.pick(Ask(MODEL), cands, lo or load(), metered=metered)
    return None if chosen is None else chosen.endpoint.id


def picks(cands: Sequence[Candidate], lo: Load, n: int = 300) -> Counter[int | None]:
    return Counter(pick(cands, lo) for _ in range(n))


def measured(board: Board, cand: Candidate, seconds: float) -> None:
    """One request served on `cand` whose first byte came after `seconds`."""
    lease = board.try_acquire(MODEL, [cand])
    assert lease is not None
    lease.first_byte = seconds
    lease.release()


# -- tiers -----------------------------------------------------------------------------
def test_a_lower_tier_wins_over_a_loaded_idle_server_of_a_higher_tier() -> None:
    gpu, cpu = cand(1, tier=0), cand(2, tier=1, loaded=True)
    busy_gpu = load(active={(1, MODEL): 3}, per_endpoint={1: 3})
    assert picks([cpu, gpu], busy_gpu) == {1: 300}


def test_requests_spill_to_the_next_tier_only_when_every_server_of_the_lower_one_is_full() -> None:
    board = Board()
    fleet = [cand(3, tier=1, limit=10), cand(1, tier=0, limit=1), cand(2, tier=0, limit=2)]
    leases = [board.try_acquire(MODEL, fleet) for _ in range(5)]
    assert all(lease is not None for lease in leases)
    held = [lease for lease in leases if lease is not None]
    ids = [lease.endpoint.id for lease in held]
    assert sorted(ids[:3]) == [1, 2, 2] and ids[3:] == [3, 3]  # tier 0's three slots, then tier 1
    held[ids.index(1)].release()  # a tier-0 slot frees: the next request goes back to tier 0
    again = board.try_acquire(MODEL, fleet)
    assert again is not None and again.endpoint.id == 1


def test_unmetered_picks_keep_tier_then_loaded_and_ignore_the_cap() -> None:
    full_gpu = load(active={(1, MODEL): 1}, per_endpoint={1: 1})
    fleet = [cand(1, tier=0, limit=1), cand(2, tier=1, loaded=True)]
    assert pick(fleet, full_gpu, metered=False) == 1
    assert pick(fleet, full_gpu, metered=True) == 2
    assert picks([cand(1, tier=1), cand(2, tier=1, loaded=True), cand(3, tier=2, loaded=True)], load()) == {
        2: 300
    }


# -- weights ---------------------------------------------------------------------------
def test_slots_held_at_once_are_shared_in_proportion_to_weight() -> None:
    board = Board()
    fleet = [cand(1, weight=3, limit=100), cand(2, weight=1, limit=100)]
    leases = [board.try_acquire(MODEL, fleet) for _ in range(40)]
    assert Counter(lease.endpoint.id for lease in leases if lease is not None) == {1: 30, 2: 10}


def test_the_weighted_share_holds_while_requests_come_and_go() -> None:
    """Eight requests always in flight: each finished one (oldest first) is replaced by a new
    one, and the 3:1 weights keep six on the heavy server and two on the light one."""
    board = Board()
    fleet = [cand(1, weight=3, limit=100), cand(2, weight=1, limit=100)]
    in_flight: list[Lease] = []
    for _ in range(200):
        while len(in_flight) < 8:
            lease = board.try_acquire(MODEL, fleet)
            assert lease is not None
            in_flight.append(lease)
        assert Counter(lease.endpoint.id for lease in in_flight) == {1: 6, 2: 2}
        in_flight.pop(0).release()


def test_a_weight_does_not_push_a_server_past_its_limit() -> None:
    board = Board()
    fleet = [cand(1, weight=5, limit=2), cand(2, weight=1, limit=4)]
    leases = [board.try_acquire(MODEL, fleet) for _ in range(7)]
    assert Counter(lease.endpoint.id if lease else None for lease in leases) == {1: 2, 2: 4, None: 1}


def test_weights_share_a_tier_after_the_loaded_preference() -> None:
    loaded_light = cand(1, weight=1, loaded=True)
    heavy = cand(2, weight=10)
    assert picks([heavy, loaded_light], load(active={(1, MODEL): 3}, per_endpoint={1: 3})) == {1: 300}


def test_the_share_of_the_whole_endpoint_breaks_a_tie_for_the_model_by_weight() -> None:
    lo = load(active={(1, MODEL): 1, (2, MODEL): 3}, per_endpoint={1: 1, 2: 4})
    # model shares: (1+1)/1 = 2 and (3+1)/2 = 2, equal; endpoint shares: 2 and 2.5
    assert picks([cand(1, weight=1), cand(2, weight=2)], lo) == {1: 300}


# -- latency-aware ties ----------------------------------------------------------------
def test_among_equally_free_servers_the_faster_first_byte_wins() -> None:
    lo = load(first_byte={(1, MODEL): 2.0, (2, MODEL): 0.5, (3, MODEL): 1.0})
    assert picks([cand(1), cand(2), cand(3)], lo) == {2: 300}


def test_first_bytes_within_the_tolerance_count_as_equally_fast() -> None:
    fast = 1.0
    close = fast * LATENCY_TOLERANCE + LATENCY_SLACK  # the slowest that still ties
    lo = load(first_byte={(1, MODEL): fast, (2, MODEL): close, (3, MODEL): close + 0.001})
    seen = picks([cand(1), cand(2), cand(3)], lo)
    assert set(seen) == {1, 2}


def test_a_server_without_an_average_yet_counts_as_the_fastest() -> None:
    lo = load(first_byte={(1, MODEL): 0.2, (2, MODEL): 3.0})
    assert set(picks([cand(1), cand(2), cand(3)], lo)) == {1, 3}
    assert set(picks([cand(2), cand(3)], lo)) == {2, 3}  # as fast as the fastest known, 2


def test_latency_only_breaks_ties_and_never_beats_a_freer_server() -> None:
    # the fast server holds a slot; the slow one is idle: load first
    lo = load(active={(1, MODEL): 1}, per_endpoint={1: 1}, first_byte={(1, MODEL): 0.1, (2, MODEL): 9.0})
    assert picks([cand(1), cand(2)], lo) == {2: 300}
    # tiers and the loaded flag come first too
    lo = load(first_byte={(1, MODEL): 0.1, (2, MODEL): 9.0})
    assert picks([cand(1, tier=1), cand(2)], lo) == {2: 300}
    assert picks([cand(1), cand(2, loaded=True)], lo) == {2: 300}


def test_a_slow_server_gets_fewer_requests_when_the_others_are_as_free() -> None:
    """Through the board: once both are measured, requests one at a time go to the fast one;
    two at a time, the slow one takes the second."""
    board = Board()
    fast, slow = cand(1), cand(2)
    measured(board, fast, 0.3)
    measured(board, slow, 1.5)
    served: Counter[int] = Counter()
    for _ in range(50):
        lease = board.try_acquire(MODEL, [slow, fast])
        assert lease is not None
        served[lease.endpoint.id] += 1
        lease.release()
    assert served == {1: 50}
    first, second = board.try_acquire(MODEL, [slow, fast]), board.try_acquire(MODEL, [slow, fast])
    assert first is not None and second is not None
    assert (first.endpoint.id, second.endpoint.id) == (1, 2)


# -- the queue -------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_waiter_takes_the_slot_that_frees_whatever_its_tier() -> None:
    """Tiers order the choice among free slots; a waiter does not wait for a lower tier."""
    board = Board()
    fleet = [cand(1, tier=0, limit=1), cand(2, tier=1, limit=1)]
    gpu, cpu = board.try_acquire(MODEL, fleet), board.try_acquire(MODEL, fleet)
    assert gpu is not None and cpu is not None
    assert (gpu.endpoint.id, cpu.endpoint.id) == (1, 2)
    first = asyncio.create_task(board.acquire(MODEL, fleet, timeout=5, queue_max=10))
    second = asyncio.create_task(board.acquire(MODEL, fleet, timeout=5, queue_max=10))
    await asyncio.sleep(0.01)
    assert board.queued() == {MODEL: 2}
    cpu.release()
    got = await asyncio.wait_for(first, 1)
    assert got.endpoint.id == 2 and not second.done()
    gpu.release()
    assert (await asyncio.wait_for(second, 1)).endpoint.id == 1
    got.release()
    (await second).release()
    assert board.active() == {} and board.queued() == {}


# -- the order as a property -----------------------------------------------------------
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # tier
            st.integers(1, 4),  # weight
            st.integers(0, 3),  # limit
            st.integers(0, 4),  # held for the model
            st.integers(0, 3),  # held for other models
            st.booleans(),  # loaded
            st.one_of(st.none(), st.sampled_from([0.1, 0.11, 0.5, 1.0, 1.3])),  # first byte
        ),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_the_pick_is_never_ranked_below_another_eligible_candidate(
    rows: list[tuple[int, int, int, int, int, bool, float | None]], metered: bool
) -> None:
    cands = [
        cand(i + 1, tier=tier, weight=weight, limit=limit, loaded=loaded)
        for i, (tier, weight, limit, _, _, loaded, _) in enumerate(rows)
    ]
    lo = load(
        active={(i + 1, MODEL): row[3] for i, row in enumerate(rows)},
        per_endpoint={i + 1: row[3] + row[4] for i, row in enumerate(rows)},
        first_byte={(i + 1, MODEL): row[6] for i, row in enumerate(rows) if row[6] is not None},
    )
    chosen = RULE.pick(Ask(MODEL), cands, lo, metered=metered)
    eligible = [c for c in cands if not metered or lo.has_free_slot(c, MODEL)]
    if chosen is None:
        assert not eligible
        return
    assert chosen in eligible
    ranks = [rank(c, MODEL, lo, metered) for c in eligible]
    best = min(r for r in ranks if r is not None)
    assert rank(chosen, MODEL, lo, metered) == best
    # no tied candidate is faster beyond the tolerance
    mine = lo.first_byte.get((chosen.endpoint.id, MODEL))
    tied = [c for c, r in zip(eligible, ranks, strict=True) if r == best]
    known = [s for c in tied if (s := lo.first_byte.get((c.endpoint.id, MODEL))) is not None]
    if mine is not None and known:
        assert mine <= min(known) * LATENCY_TOLERANCE + LATENCY_SLACK
