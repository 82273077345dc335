"""The queue discipline (routing/engine/fair_queue.py): priority, turns between clients, arrival order,
aging; properties over any sequence of arrivals and services (hypothesis)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from routing.engine.fair_queue import HIGH, LOW, NORMAL, FairQueue


class Served:
    """The board's side: a counter stamped on a client each time it gets a slot."""

    def __init__(self) -> None:
        self.stamps: dict[str, int] = {}
        self._tick = itertools.count()

    def pop(self, queue: FairQueue[int], now: float) -> tuple[str, int] | None:
        entry = queue.pop(now, self.stamps)
        if entry is None:
            return None
        self.stamps[entry.client] = next(self._tick)
        return entry.client, entry.item


def test_the_highest_priority_goes_first():
    q: FairQueue[int] = FairQueue(aging=0)
    q.push(1, "a", LOW, 0)
    q.push(2, "b", NORMAL, 0)
    q.push(3, "c", HIGH, 0)
    served = Served()
    assert [served.pop(q, 1)[1] for _ in range(3)] == [3, 2, 1]  # type: ignore[index]
    assert served.pop(q, 1) is None and len(q) == 0


def test_a_single_request_of_another_client_is_served_before_a_flood():
    q: FairQueue[int] = FairQueue(aging=0)
    served = Served()
    served.stamps["flood"] = 0  # it already holds slots
    for i in range(50):
        q.push(i, "flood", NORMAL, 0)
    q.push(99, "one", NORMAL, 1)
    assert served.pop(q, 2) == ("one", 99)
    assert [served.pop(q, 2) for _ in range(50)] == [("flood", i) for i in range(50)]


def test_clients_take_turns_within_a_priority():
    q: FairQueue[int] = FairQueue(aging=0)
    served = Served()
    for i in range(3):
        q.push(i, "a", NORMAL, 0)
    for i in range(10, 13):
        q.push(i, "b", NORMAL, 0)
    order = [served.pop(q, 1) for _ in range(6)]
    assert [c for c, _ in order] == ["a", "b", "a", "b", "a", "b"]  # type: ignore[misc]


def test_aging_lifts_a_low_request_one_level_per_period():
    q: FairQueue[int] = FairQueue(aging=10)
    low = q.push(1, "low", LOW, 0)
    assert q.effective_level(low, 9.9) == LOW
    assert q.effective_level(low, 10) == NORMAL
    assert q.effective_level(low, 25) == HIGH
    q.push(2, "high", HIGH, 24)
    served = Served()
    served.stamps["low"] = 5  # served more recently than "high" (never): high still goes first
    assert served.pop(q, 25) == ("high", 2)
    assert served.pop(q, 25) == ("low", 1)


def test_remove_takes_an_entry_out_once():
    q: FairQueue[int] = FairQueue(aging=0)
    a = q.push(1, "a", NORMAL, 0)
    b = q.push(2, "a", NORMAL, 0)
    assert q.remove(b) and not q.remove(b)
    assert len(q) == 1 and list(q) == [a]
    assert q.remove(a) and not q
    assert q.peek(0, {}) is None


# -- properties ------------------------------------------------------------------------------

clients = st.sampled_from(["a", "b", "c", "d", "e"])
levels = st.sampled_from([HIGH, NORMAL, LOW])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), clients, levels),
        st.tuples(st.just("pop"), st.just(""), st.just(0)),
        st.tuples(st.just("tick"), st.just(""), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_fifo_within_a_client_and_level_and_nothing_lost(operations):
    q: FairQueue[int] = FairQueue(aging=3)
    served = Served()
    now = 0.0
    pushed: dict[tuple[str, int], list[int]] = {}
    popped: dict[tuple[str, int], list[int]] = {}
    levels_of: dict[int, int] = {}
    n = 0
    for op, client, level in operations:
        if op == "push":
            n += 1
            q.push(n, client, level, now)
            pushed.setdefault((client, level), []).append(n)
            levels_of[n] = level
        elif op == "pop":
            got = served.pop(q, now)
            if got is not None:
                popped.setdefault((got[0], levels_of[got[1]]), []).append(got[1])
        else:
            now += 1
    while (got := served.pop(q, now)) is not None:
        popped.setdefault((got[0], levels_of[got[1]]), []).append(got[1])
    assert popped == pushed  # everything served once, each client's own order kept


@settings(max_examples=300, deadline=None)
@given(ops)
def test_higher_priority_first_without_aging(operations):
    q: FairQueue[int] = FairQueue(aging=0)  # never lifts
    served = Served()
    levels_of: dict[int, int] = {}
    n = 0
    for op, client, level in operations:
        if op == "push":
            n += 1
            q.push(n, client, level, 0)
            levels_of[n] = level
        elif op == "pop":
            waiting = min((e.level for e in q), default=None)
            got = served.pop(q, 0)
            if got is not None:
                assert levels_of[got[1]] == waiting  # never a lower level while a higher one waits


CLIENT_LEVEL = {"a": HIGH, "b": NORMAL, "c": LOW, "d": NORMAL, "e": LOW}  # a key has one priority


@settings(max_examples=300, deadline=None)
@given(ops)
def test_no_starvation_a_head_at_the_top_waits_at_most_one_turn_of_each_other_client(operations):
    aging = 2.0
    q: FairQueue[int] = FairQueue(aging=aging)
    served = Served()
    now = 0.0
    n = 0
    passed_over: dict[int, int] = {}  # entry -> pops that served another while it was a top head
    for op, client, _ in [*operations, *[("tick", "", 0)] * 5, *[("pop", "", 0)] * 130]:
        if op == "push":
            n += 1
            q.push(n, client, CLIENT_LEVEL[client], now)
        elif op == "tick":
            now += 1
        else:
            heads: dict[str, int] = {}
            for entry in q:
                if q.effective_level(entry, now) == HIGH:
                    heads.setdefault(entry.client, entry.item)
            got = served.pop(q, now)
            if got is None:
                continue
            for head in heads.values():
                if head != got[1]:
                    passed_over[head] = passed_over.get(head, 0) + 1
                    assert passed_over[head] <= len(CLIENT_LEVEL) - 1
    assert len(q) == 0  # and everything was served


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(clients, levels), min_size=1, max_size=60), st.floats(0.5, 5))
def test_after_enough_aging_every_client_is_served_within_a_round(arrivals, aging):
    """Everyone waited long enough to be at the top: the next pops give each waiting client a
    turn before any client gets a second one (a round)."""
    q: FairQueue[int] = FairQueue(aging=aging)
    served = Served()
    for i, (client, level) in enumerate(arrivals):
        q.push(i, client, level, 0)
    now = 3 * aging  # every entry at level 0 now
    waiting = {e.client for e in q}
    first_round = [served.pop(q, now)[0] for _ in range(len(waiting))]  # type: ignore[index]
    assert sorted(first_round) == sorted(waiting)
