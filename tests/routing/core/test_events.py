"""routing/core/events.Signal: receivers run in connect order with the sender's arguments,
connect is idempotent, disconnect removes, a raising receiver propagates to the sender."""

from __future__ import annotations

import threading

import pytest

from routing.core.events import Signal


def test_receivers_run_in_connect_order_with_the_arguments():
    sig: Signal[[int, str]] = Signal("t")
    seen: list[tuple[str, int, str]] = []
    sig.connect(lambda n, s: seen.append(("a", n, s)))
    sig.connect(lambda n, s: seen.append(("b", n, s)))
    sig.send(1, "x")
    sig.send(2, "y")
    assert seen == [("a", 1, "x"), ("b", 1, "x"), ("a", 2, "y"), ("b", 2, "y")]


def test_connect_is_idempotent_and_disconnect_removes():
    sig: Signal[[]] = Signal("t")
    calls: list[int] = []

    def receiver() -> None:
        calls.append(1)

    sig.connect(receiver)
    sig.connect(receiver)
    assert sig.receivers == (receiver,)
    sig.send()
    assert calls == [1]
    sig.disconnect(receiver)
    sig.disconnect(receiver)  # not connected: ignored
    sig.send()
    assert calls == [1] and sig.receivers == ()


def test_a_bound_method_connected_twice_is_one_receiver():
    class Owner:
        def __init__(self) -> None:
            self.n = 0

        def notify(self) -> None:
            self.n += 1

    owner = Owner()
    sig: Signal[[]] = Signal("t")
    sig.connect(owner.notify)
    sig.connect(owner.notify)  # a new bound-method object, equal to the first
    sig.send()
    assert owner.n == 1


def test_a_raising_receiver_propagates_and_stops_the_rest():
    sig: Signal[[]] = Signal("t")
    after: list[int] = []

    def broken() -> None:
        raise RuntimeError("bug")

    sig.connect(broken)
    sig.connect(lambda: after.append(1))
    with pytest.raises(RuntimeError, match="bug"):
        sig.send()
    assert after == []


def test_a_send_during_connect_sees_a_whole_tuple():
    """Connecting from another thread while sending never breaks the send's loop."""
    sig: Signal[[]] = Signal("t")
    count = [0]

    def receiver() -> None:
        count[0] += 1

    sig.connect(receiver)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():

            def passer() -> None:
                pass

            sig.connect(passer)
            sig.disconnect(passer)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20_000):
            sig.send()
    finally:
        stop.set()
        thread.join()
    assert count[0] == 20_000
    assert sig.receivers == (receiver,)
