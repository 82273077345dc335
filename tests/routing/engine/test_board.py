"""Selection, slot reservation and the first-come-first-served queue (routing/engine/board.py)."""

from __future__ import annotations

import asyncio

import pytest

from routing.engine.board import Board, Lease, QueueFull, QueueTimeout
from tests.routing.fleet.factories import candidate as cand


def test_it_prefers_an_endpoint_where_the_model_is_loaded():
    board = Board()
    for _ in range(20):
        cands = [cand(1, limit=4), cand(2, limit=4, loaded=True), cand(3, limit=4)]
        lease = board.try_acquire("m:latest", cands)
        assert lease is not None and lease.endpoint.id == 2
        lease.release()


def test_it_prefers_the_least_busy_endpoint_for_the_model():
    board = Board()
    first = board.try_acquire("m:latest", [cand(1, limit=4, loaded=True)])
    assert first is not None
    lease = board.try_acquire("m:latest", [cand(1, limit=4, loaded=True), cand(2, limit=4, loaded=True)])
    assert lease is not None and lease.endpoint.id == 2


def test_it_prefers_the_least_busy_endpoint_overall_on_a_tie():
    board = Board()
    other = board.try_acquire("other:latest", [cand(1, limit=4, model="other:latest")])
    assert other is not None
    lease = board.try_acquire("m:latest", [cand(1, limit=4), cand(2, limit=4)])
    assert lease is not None and lease.endpoint.id == 2


def test_it_breaks_ties_at_random():
    board = Board()
    chosen = set()
    for _ in range(200):
        lease = board.try_acquire("m:latest", [cand(1, limit=4), cand(2, limit=4), cand(3, limit=4)])
        assert lease is not None
        chosen.add(lease.endpoint.id)
        lease.release()
    assert chosen == {1, 2, 3}


def test_it_never_reserves_past_the_limit():
    board = Board()
    leases = [board.try_acquire("m:latest", [cand(1, limit=2)]) for _ in range(3)]
    assert leases[0] is not None and leases[1] is not None and leases[2] is None
    assert board.active() == {(1, "m:latest"): 2}


def test_it_counts_slots_per_model_on_the_same_endpoint():
    board = Board()
    a = board.try_acquire("a:latest", [cand(1, limit=1, model="a")])
    b = board.try_acquire("b:latest", [cand(1, limit=1, model="b")])
    assert a is not None and b is not None
    assert board.active() == {(1, "a:latest"): 1, (1, "b:latest"): 1}


def test_it_releases_a_lease_only_once():
    board = Board()
    lease = board.try_acquire("m:latest", [cand(1, limit=2)])
    assert lease is not None
    lease.release()
    lease.release()
    assert board.active() == {}


@pytest.mark.asyncio
async def test_it_serves_waiters_first_come_first_served():
    board = Board()
    held = board.try_acquire("m:latest", [cand(1)])
    assert held is not None
    order: list[int] = []

    async def wait(n: int) -> None:
        lease = await board.acquire("m:latest", [cand(1)], timeout=5, queue_max=10)
        order.append(n)
        await asyncio.sleep(0.01)
        lease.release()

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(wait(n)))
        await asyncio.sleep(0.001)
    assert board.queued() == {"m:latest": 5}
    held.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert board.active() == {} and board.queued_total() == 0


@pytest.mark.asyncio
async def test_it_makes_a_newcomer_wait_behind_queued_requests():
    board = Board()
    held = board.try_acquire("m:latest", [cand(1)])
    assert held is not None
    waiter = asyncio.create_task(board.acquire("m:latest", [cand(1)], timeout=5, queue_max=10))
    await asyncio.sleep(0.01)
    held.release()  # handed straight to the waiter, not left for a newcomer
    assert board.try_acquire("m:latest", [cand(1)]) is None
    lease = await waiter
    lease.release()


@pytest.mark.asyncio
async def test_it_times_out_a_waiter_and_forgets_it():
    board = Board()
    held = board.try_acquire("m:latest", [cand(1)])
    assert held is not None
    with pytest.raises(QueueTimeout):
        await board.acquire("m:latest", [cand(1)], timeout=0.05, queue_max=10)
    assert board.queued_total() == 0
    held.release()
    assert board.active() == {}


@pytest.mark.asyncio
async def test_it_refuses_at_once_when_the_queue_is_full():
    board = Board()
    held = board.try_acquire("m:latest", [cand(1)])
    assert held is not None
    first = asyncio.create_task(board.acquire("m:latest", [cand(1)], timeout=5, queue_max=1))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await board.acquire("m:latest", [cand(1)], timeout=5, queue_max=1)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    held.release()
    assert board.active() == {} and board.queued_total() == 0


@pytest.mark.asyncio
async def test_one_request_waiting_in_several_queues_counts_once_until_it_leaves_the_last():
    board = Board()
    a, b = cand(1, model="a:latest"), cand(2, model="b:latest")
    held = [board.try_acquire("a:latest", [a]), board.try_acquire("b:latest", [b])]
    request = object()
    in_a = asyncio.create_task(board.acquire("a:latest", [a], timeout=5, queue_max=1, request=request))
    in_b = asyncio.create_task(board.acquire("b:latest", [b], timeout=5, queue_max=1, request=request))
    await asyncio.sleep(0.01)
    assert board.queued() == {"a:latest": 1, "b:latest": 1} and board.queued_total() == 1
    with pytest.raises(QueueFull):  # another request: the one place is taken
        await board.acquire("b:latest", [b], timeout=5, queue_max=1)
    in_a.cancel()
    await asyncio.gather(in_a, return_exceptions=True)
    assert board.queued_total() == 1  # still waiting in b's queue
    with pytest.raises(QueueFull):
        await board.acquire("a:latest", [a], timeout=5, queue_max=1)
    held[1].release()  # type: ignore[union-attr]
    (await in_b).release()
    assert board.queued_total() == 0
    held[0].release()  # type: ignore[union-attr]
    assert board.active() == {}


@pytest.mark.asyncio
async def test_it_leaks_no_slot_when_a_waiter_is_cancelled_as_its_slot_arrives():
    board = Board()
    held = board.try_acquire("m:latest", [cand(1)])
    assert held is not None
    waiter = asyncio.create_task(board.acquire("m:latest", [cand(1)], timeout=5, queue_max=10))
    await asyncio.sleep(0.01)
    held.release()  # grants the slot to the waiter's future...
    waiter.cancel()  # ...and the waiter is cancelled before it can run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert board.active() == {} and board.queued_total() == 0


@pytest.mark.asyncio
async def test_it_keeps_forty_requests_within_a_limit_of_two():
    board = Board()
    in_flight = 0
    peak = 0

    async def request() -> None:
        nonlocal in_flight, peak
        lease = await board.acquire("m:latest", [cand(1, limit=2)], timeout=10, queue_max=100)
        try:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.002)
        finally:
            in_flight -= 1
            lease.release()

    await asyncio.gather(*(request() for _ in range(40)))
    assert peak == 2
    assert board.active() == {} and board.queued_total() == 0


@pytest.mark.asyncio
async def test_it_gives_queued_requests_the_slots_of_a_raised_limit():
    board = Board()
    held = board.try_acquire("m:latest", [cand(1, limit=1)])
    assert held is not None
    waiter = asyncio.create_task(board.acquire("m:latest", [cand(1, limit=1)], timeout=5, queue_max=10))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    board.set_limits({1: 2})  # the admin raised the limit
    lease = await asyncio.wait_for(waiter, 1)
    assert board.active() == {(1, "m:latest"): 2}
    lease.release()
    held.release()


def test_it_gives_no_new_slot_on_a_disabled_endpoint():
    board = Board()
    board.set_limits({1: 0, 2: 1})
    lease = board.try_acquire("m:latest", [cand(1, limit=4), cand(2, limit=1)])
    assert lease is not None and lease.endpoint.id == 2
    assert board.try_acquire("m:latest", [cand(1, limit=4)]) is None


# -- the queue's order with clients and priorities (routing/engine/fair_queue.py) -------------
@pytest.mark.asyncio
async def test_a_freed_slot_goes_to_another_client_before_a_floods_next_request():
    board = Board()
    held = board.try_acquire("m:latest", [cand(1)], client="flood")
    assert held is not None
    waiting = [
        asyncio.ensure_future(board.acquire("m:latest", [cand(1)], timeout=5, queue_max=100, client="flood"))
        for _ in range(20)
    ]
    await asyncio.sleep(0)
    single = asyncio.ensure_future(
        board.acquire("m:latest", [cand(1)], timeout=5, queue_max=100, client="one")
    )
    await asyncio.sleep(0)
    held.release()
    lease = await asyncio.wait_for(single, 1)
    assert lease.client == "one" and not any(w.done() for w in waiting)
    assert board.active_by_client() == {"one": 1}
    lease.release()
    for w in waiting:
        (await asyncio.wait_for(w, 1)).release()
    assert board.active_by_client() == {} and board.queued_total() == 0


@pytest.mark.asyncio
async def test_a_higher_priority_waiter_goes_first_and_a_cancelled_one_frees_nothing(settings):
    settings.ROUTER_PRIORITY_AGING = 0  # no aging here
    board = Board()
    held = board.try_acquire("m:latest", [cand(1)], client="x")
    assert held is not None

    def ask(client: str, priority: int) -> asyncio.Future[Lease]:
        return asyncio.ensure_future(
            board.acquire("m:latest", [cand(1)], timeout=5, queue_max=100, client=client, priority=priority)
        )

    low, gone, high = ask("low", 2), ask("gone", 0), ask("high", 0)
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    held.release()
    first = await asyncio.wait_for(high, 1)
    assert first.client == "high" and not low.done()
    first.release()
    (await asyncio.wait_for(low, 1)).release()
    assert board.queued_total() == 0 and board.active() == {}
