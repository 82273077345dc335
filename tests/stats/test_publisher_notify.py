"""Publisher.notify: callable from any thread, never raises, coalesces while a snapshot is pending."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stats.publisher import Publisher


def attached(loop: asyncio.AbstractEventLoop) -> Publisher:
    """A publisher whose loop is `loop`, as run() leaves it (without running it)."""
    pub = Publisher()
    pub._loop = loop
    pub._loop_thread = threading.get_ident()
    pub._wake = asyncio.Event()
    return pub


@pytest.mark.asyncio
async def test_a_change_wakes_the_publisher_once_until_its_snapshot_is_built() -> None:
    pub = attached(asyncio.get_running_loop())
    assert pub._wake is not None
    pub.notify()
    assert pub._dirty and pub._wake.is_set()
    pub._wake.clear()  # the publisher woke; its snapshot is not built yet
    pub.notify()
    assert not pub._wake.is_set()  # coalesced: the pending snapshot will include this change
    pub._dirty = False  # publish_now clears it before building
    pub.notify()
    assert pub._wake.is_set()


@pytest.mark.asyncio
async def test_a_change_in_another_thread_wakes_the_loop() -> None:
    pub = attached(asyncio.get_running_loop())
    assert pub._wake is not None
    worker = threading.Thread(target=pub.notify)
    worker.start()
    worker.join()
    await asyncio.wait_for(pub._wake.wait(), timeout=2)
    assert pub._dirty


def test_a_change_after_the_loop_closed_is_dropped_quietly() -> None:
    loop = asyncio.new_event_loop()
    pub = attached(loop)
    loop.close()
    pub.notify()  # no exception, nothing scheduled on a closed loop
    assert pub._dirty
    errors: list[BaseException] = []
    from_thread = attached(loop)

    def notify() -> None:
        try:
            from_thread.notify()
        except BaseException as exc:  # a thread's exception would otherwise only be printed
            errors.append(exc)

    other = threading.Thread(target=notify)
    other.start()
    other.join()
    assert errors == [] and from_thread._dirty
