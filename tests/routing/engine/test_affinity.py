"""Prompt-cache affinity (routing/engine/affinity.py): the memory (time to live, bound, least
recently used first out), the strategy around a base (the remembered server when it is free,
never over the cap, the base otherwise) and the board's wait for a remembered server that is
full (routing/engine/board.py): the waiter keeps its place, others are served past it, and once
its wait is over it goes elsewhere and the memory follows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.engine.affinity import Affinity, AffinityMap, memory_key
from routing.engine.board import Board, Lease
from routing.engine.fair_queue import FairQueue
from routing.engine.selection import Ask, Load, TieredLeastBusy
from routing.fleet.candidates import Candidate
from tests.routing.fleet.factories import MODEL, candidate

cand = partial(candidate, limit=2)  # two slots unless told


def load(active: dict[tuple[int, str], int] | None = None, limits: dict[int, int] | None = None) -> Load:
    active = active or {}
    per_endpoint: dict[int, int] = {}
    for (endpoint, _), held in active.items():
        per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + held
    return Load(active, per_endpoint, limits or {}, {})


class Base:
    """A base strategy that records its calls and takes the first free candidate."""

    name = "first-free"

    def __init__(self) -> None:
        self.calls = 0

    def pick(
        self, ask: Ask, candidates: Sequence[Candidate], load: Load, *, metered: bool
    ) -> Candidate | None:
        self.calls += 1
        for c in candidates:
            if not metered or load.has_free_slot(c, ask.model):
                return c
        return None


def chosen(strategy: Affinity, ask: Ask, cands: Sequence[Candidate], lo: Load) -> int | None:
    found = strategy.pick(ask, cands, lo, metered=True)
    return None if found is None else found.endpoint.id


# -- the memory ---------------------------------------------------------------------------


def test_the_memory_forgets_an_entry_ttl_seconds_after_its_last_use() -> None:
    memory = AffinityMap(ttl=10, max_entries=10)
    memory.put("a", 1, now=100)
    assert memory.get("a", now=109) == 1
    memory.put("a", 1, now=109)  # used again: lives until 119
    assert memory.get("a", now=118) == 1
    assert memory.get("a", now=119) is None
    assert len(memory) == 0  # dropped, not only hidden


def test_the_memory_is_bounded_and_drops_the_least_recently_used_first() -> None:
    memory = AffinityMap(ttl=100, max_entries=3)
    for i, key in enumerate("abc"):
        memory.put(key, i, now=0)
    memory.put("a", 0, now=1)  # "a" is now the most recently used
    memory.put("d", 3, now=2)
    assert len(memory) == 3
    assert memory.get("b", now=3) is None
    assert [memory.get(k, now=3) for k in "acd"] == [0, 2, 3]


def test_the_memory_says_when_the_shared_copy_needs_writing() -> None:
    memory = AffinityMap(ttl=100, max_entries=10)
    assert memory.put("a", 1, now=0) is True  # new
    assert memory.put("a", 1, now=10) is False  # same, written recently
    assert memory.put("a", 2, now=11) is True  # moved
    assert memory.put("a", 2, now=62) is True  # half the ttl since the last write: refresh


def test_an_entry_learnt_from_elsewhere_never_overrides_what_this_process_knows() -> None:
    memory = AffinityMap(ttl=100, max_entries=10)
    memory.put("a", 1, now=0)
    memory.learn("a", 2, now=1)
    memory.learn("b", 3, now=1)
    assert (memory.get("a", now=2), memory.get("b", now=2)) == (1, 3)


# -- the strategy -------------------------------------------------------------------------


def test_a_conversation_goes_back_to_the_server_it_went_to_while_it_has_a_free_slot() -> None:
    strategy = Affinity(TieredLeastBusy(), wait=0)
    cands = [cand(1), cand(2), cand(3)]
    first = chosen(strategy, Ask(MODEL, "conv"), cands, load())
    assert first is not None
    # busier than the others, but free: still the one
    busy = load({(first, MODEL): 1})
    assert all(chosen(strategy, Ask(MODEL, "conv"), cands, busy) == first for _ in range(20))


def test_it_delegates_without_a_key_unmetered_and_for_a_server_no_longer_a_candidate() -> None:
    base = Base()
    strategy = Affinity(base, wait=0)
    assert chosen(strategy, Ask(MODEL), [cand(1), cand(2)], load()) == 1
    assert strategy.pick(Ask(MODEL, "c"), [cand(2)], load(), metered=False) is not None
    assert len(strategy.memory) == 0  # neither remembered anything
    strategy.memory.put(memory_key(MODEL, "c"), 3, now=time.monotonic())
    calls = base.calls
    assert chosen(strategy, Ask(MODEL, "c"), [cand(1), cand(2)], load()) == 1
    assert base.calls == calls + 1
    assert strategy.memory.get(memory_key(MODEL, "c"), time.monotonic()) == 1  # follows the choice


def test_the_memory_is_per_model() -> None:
    strategy = Affinity(Base(), wait=0)
    strategy.memory.put(memory_key("other:latest", "c"), 2, now=time.monotonic())
    assert chosen(strategy, Ask(MODEL, "c"), [cand(1), cand(2)], load()) == 1


def test_a_full_remembered_server_is_waited_for_within_the_hold_then_left() -> None:
    strategy = Affinity(Base(), wait=30)
    strategy.memory.put(memory_key(MODEL, "c"), 2, now=time.monotonic())
    full = load({(2, MODEL): 2})
    assert chosen(strategy, Ask(MODEL, "c"), [cand(1), cand(2)], full) is None  # waits for 2
    long_ago = Ask(MODEL, "c", since=time.monotonic() - 31)
    assert chosen(strategy, long_ago, [cand(1), cand(2)], full) == 1  # waited enough
    assert strategy.memory.get(memory_key(MODEL, "c"), time.monotonic()) == 1
    # a disabled server (limit 0) is not waited for
    strategy.memory.put(memory_key(MODEL, "d"), 2, now=time.monotonic())
    assert chosen(strategy, Ask(MODEL, "d"), [cand(1), cand(2)], load(limits={2: 0})) == 1


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=5),
    st.integers(1, 6),
    st.booleans(),
)
def test_it_never_picks_a_full_server(rows: list[tuple[int, int]], remembered: int, old: bool) -> None:
    """Any limits, counters and memory; waiting or not: a choice always has a free slot, and
    None only when nothing is free or while the remembered server is waited for."""
    strategy = Affinity(TieredLeastBusy(), wait=30)
    now = time.monotonic()
    strategy.memory.put(memory_key(MODEL, "c"), remembered, now=now)
    cands = [cand(i + 1, limit=limit) for i, (limit, _) in enumerate(rows)]
    lo = load({(i + 1, MODEL): held for i, (_, held) in enumerate(rows)})
    ask = Ask(MODEL, "c", since=now - 60 if old else now)
    found = strategy.pick(ask, cands, lo, metered=True)
    free = [c for c in cands if lo.has_free_slot(c, MODEL)]
    if found is not None:
        assert found in free
    elif free:
        mine = [c for c in cands if c.endpoint.id == remembered]
        assert not old and mine and not lo.has_free_slot(mine[0], MODEL) and lo.limit(mine[0]) > 0


def test_remembered_entries_go_to_the_outbox_only_when_shared() -> None:
    alone = Affinity(Base(), wait=0)
    assert alone.outbox is None
    shared = Affinity(Base(), wait=0, share=True)
    assert chosen(shared, Ask(MODEL, "c"), [cand(1)], load()) == 1
    assert chosen(shared, Ask(MODEL, "c"), [cand(1)], load()) == 1
    assert list(shared.outbox or ()) == [(memory_key(MODEL, "c"), 1)]  # once: nothing changed since
    shared.inbox.append((memory_key(MODEL, "x"), 2))  # read from Redis by another path
    assert chosen(shared, Ask(MODEL, "x"), [cand(1), cand(2)], load()) == 2


# -- the queue: passing over a held entry ---------------------------------------------------


def test_the_queue_passes_over_skipped_entries_and_keeps_everyone_elses_order() -> None:
    queue: FairQueue[str] = FairQueue(aging=0)
    a1 = queue.push("a1", "alice", 1, now=0)
    a2 = queue.push("a2", "alice", 1, now=0)
    b1 = queue.push("b1", "bob", 1, now=0)
    assert queue.peek(1, {}) is a1
    assert queue.peek(1, {}, {a1}) is a2  # alice's next one, still ahead of bob
    assert queue.peek(1, {}, {a1, a2}) is b1
    assert queue.peek(1, {}, {a1, a2, b1}) is None
    assert len(queue) == 3  # peeking removes nothing


# -- the board's wait -------------------------------------------------------------------------


def _board(wait: float) -> tuple[Board, Affinity]:
    strategy = Affinity(TieredLeastBusy(), wait=wait)
    return Board(strategy), strategy


def _server_1_busy(board: Board, strategy: Affinity, cands: Sequence[Candidate]) -> Lease:
    """Another conversation holds server 1 (`cands[0]`, one slot), where conversation "c" was
    served last. Returns the other conversation's lease."""
    other = board.try_acquire(MODEL, [cands[0]])
    assert other is not None
    strategy.memory.put(memory_key(MODEL, "c"), 1, now=time.monotonic())
    return other


async def _queued_c(board: Board, cands: list[Candidate]) -> asyncio.Task[Lease]:
    """Conversation "c" asks, and is in the queue once this returns (its server is full)."""
    waiter = asyncio.create_task(board.acquire(MODEL, cands, timeout=60, queue_max=10, affinity="c"))
    await asyncio.sleep(0)
    return waiter


@pytest.mark.asyncio
async def test_a_waiter_gets_its_own_server_when_a_slot_frees_there_within_the_wait() -> None:
    board, strategy = _board(wait=60)
    cands = [cand(1, limit=1), cand(2, limit=1)]
    other = _server_1_busy(board, strategy, cands)
    waiter = await _queued_c(board, cands)
    assert board.queued() == {MODEL: 1} and board.active_for(2) == 0  # 2 is free, not taken
    other.release()
    lease = await asyncio.wait_for(waiter, 5)
    assert lease.endpoint.id == 1
    lease.release()


@pytest.mark.asyncio
async def test_a_held_waiter_does_not_hold_up_requests_that_a_free_server_can_take() -> None:
    board, strategy = _board(wait=60)
    cands = [cand(1, limit=1), cand(2, limit=1)]
    blocker = _server_1_busy(board, strategy, cands)
    held = await _queued_c(board, cands)
    assert board.queued() == {MODEL: 1}
    # a later request, with no key, is not queued behind it: server 2 is free
    later = await asyncio.wait_for(board.acquire(MODEL, cands, timeout=60, queue_max=10), 1)
    assert later.endpoint.id == 2
    assert not held.done()
    blocker.release()
    lease = await asyncio.wait_for(held, 5)
    assert lease.endpoint.id == 1
    for x in (lease, later):
        x.release()
    assert board.active() == {} and board.queued() == {}


@pytest.mark.asyncio
async def test_after_the_wait_a_waiter_takes_another_free_server_and_the_memory_follows() -> None:
    wait = 0.2
    board, strategy = _board(wait=wait)
    cands = [cand(1, limit=1), cand(2, limit=1)]
    blocker = _server_1_busy(board, strategy, cands)
    asked = time.monotonic()
    lease = await asyncio.wait_for(board.acquire(MODEL, cands, timeout=60, queue_max=10, affinity="c"), 5)
    assert time.monotonic() - asked >= wait  # it never goes elsewhere before its wait is over
    assert lease.endpoint.id == 2
    assert strategy.memory.get(memory_key(MODEL, "c"), time.monotonic()) == 2
    for x in (lease, blocker):
        x.release()
    assert board.queued() == {}


@pytest.mark.asyncio
async def test_a_waiter_whose_wait_is_over_is_served_in_its_turn_like_any_other() -> None:
    board, strategy = _board(wait=0.05)
    cands = [cand(1, limit=1), cand(2, limit=1)]
    one, two = board.try_acquire(MODEL, [cands[0]]), board.try_acquire(MODEL, [cands[1]])
    assert one is not None and two is not None
    strategy.memory.put(memory_key(MODEL, "c"), 1, now=time.monotonic())
    waiter = await _queued_c(board, cands)
    later = asyncio.create_task(board.acquire(MODEL, cands, timeout=60, queue_max=10))
    await asyncio.sleep(0.1)  # the waiter's wait (0.05 s) is over; everything is still full
    assert board.queued() == {MODEL: 2}
    two.release()  # server 2 frees: the waiter is first in line and no longer holds out
    lease = await asyncio.wait_for(waiter, 5)
    assert lease.endpoint.id == 2 and not later.done()
    assert strategy.memory.get(memory_key(MODEL, "c"), time.monotonic()) == 2
    one.release()
    got_later = await asyncio.wait_for(later, 5)
    assert got_later.endpoint.id == 1
    for x in (lease, got_later):
        x.release()
    assert board.active() == {}


@pytest.mark.asyncio
async def test_requests_of_one_key_at_the_same_time_are_spread_not_queued_for_one_server() -> None:
    """Several conversations with one prefix (a shared few-shot prompt, a batch job)."""
    board, strategy = _board(wait=60)
    cands = [cand(1, limit=1), cand(2, limit=1), cand(3, limit=1)]
    leases = [
        await asyncio.wait_for(board.acquire(MODEL, cands, timeout=60, queue_max=10, affinity="same"), 1)
        for _ in range(3)
    ]
    assert sorted(x.endpoint.id for x in leases) == [1, 2, 3]
    for x in leases:
        x.release()
    entry = strategy.memory.entry(memory_key(MODEL, "same"), time.monotonic())
    assert entry is not None and entry.busy == 0  # the board told it each slot came back


@pytest.mark.asyncio
async def test_only_one_request_of_a_key_waits_for_its_server() -> None:
    board, strategy = _board(wait=60)
    cands = [cand(1, limit=1), cand(2, limit=2)]
    blocker = _server_1_busy(board, strategy, cands)
    waiter = await _queued_c(board, cands)
    assert board.queued() == {MODEL: 1}
    second = await asyncio.wait_for(board.acquire(MODEL, cands, timeout=60, queue_max=10, affinity="c"), 1)
    assert second.endpoint.id == 2 and not waiter.done()
    second.release()
    blocker.release()
    first = await asyncio.wait_for(waiter, 5)
    first.release()
    # the next turn, alone again, may wait once more
    blocker = _server_1_busy(board, strategy, cands)
    again = await _queued_c(board, cands)
    assert board.queued() == {MODEL: 1}
    blocker.release()
    lease = await asyncio.wait_for(again, 5)
    assert lease.endpoint.id == 1
    lease.release()


def test_it_counts_its_choices_for_metrics() -> None:
    strategy = Affinity(Base(), wait=30)
    cands = [cand(1, limit=1), cand(2, limit=1)]
    assert chosen(strategy, Ask(MODEL, "c"), cands, load()) == 1  # new
    assert chosen(strategy, Ask(MODEL, "c"), cands, load()) == 1  # kept
    full = load({(1, MODEL): 1})
    strategy.memory.done(memory_key(MODEL, "c"))
    strategy.memory.done(memory_key(MODEL, "c"))  # both gave their slots back
    waiting = Ask(MODEL, "c")
    assert chosen(strategy, waiting, cands, full) is None  # waited
    assert chosen(strategy, waiting, cands, full) is None  # the same wait, not counted again
    assert chosen(strategy, Ask(MODEL, "c", since=time.monotonic() - 60), cands, full) == 2  # moved
    assert strategy.counts == {"kept": 1, "moved": 1, "new": 1, "waited": 1}


def test_a_conversation_that_spilled_to_a_higher_tier_comes_back_when_the_lower_has_room() -> None:
    # The remembered server once won over the tiers: a conversation that spilled to tier 1 (a
    # paid API) while tier 0 was full stayed there for its whole life.
    strategy = Affinity(TieredLeastBusy(), wait=30)
    gpu, paid = cand(1, limit=1, tier=0), cand(2, limit=4, tier=1)
    key = memory_key(MODEL, "c")
    strategy.memory.put(key, 2, now=time.monotonic())
    assert chosen(strategy, Ask(MODEL, "c"), [gpu, paid], load()) == 1  # not waited for, not kept
    assert strategy.memory.get(key, time.monotonic()) == 1
    # tier 0 full: the remembered tier-1 server is kept
    strategy.memory.put(key, 2, now=time.monotonic())
    assert chosen(strategy, Ask(MODEL, "c"), [gpu, paid], load({(1, MODEL): 1})) == 2
    # remembered on tier 0, which is full: waited for, not left for tier 1 at once
    strategy.memory.put(memory_key(MODEL, "d"), 1, now=time.monotonic())
    assert chosen(strategy, Ask(MODEL, "d"), [gpu, paid], load({(1, MODEL): 1})) is None
