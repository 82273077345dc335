"""The circuit breaker's state machine (routing/fleet/breaker.py) and how failures are judged
(routing/upstream/client.py verdict / status_verdict / closed_before_reply)."""

from __future__ import annotations

import errno
import time

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.fleet.breaker import Breakers, State
from routing.upstream import failures
from routing.upstream.failures import Evidence, Failure


def make(threshold: int = 3) -> tuple[Breakers, list[int]]:
    b = Breakers(lambda: threshold)
    changes: list[int] = []
    b.changed.connect(lambda: changes.append(1))
    return b, changes


def test_strong_evidence_opens_at_once_and_records_reason_and_since():
    b, changes = make()
    before = time.time()
    assert b.failed(1, "connection refused", strong=True) is True
    view = b.view(1)
    assert view.state is State.OPEN and view.reason == "connection refused"
    assert view.since is not None and before <= view.since <= time.time()
    assert b.is_open(1) and not b.is_open(2) and changes == [1]


def test_weak_evidence_opens_only_when_it_repeats_without_a_good_reply_between():
    b, _ = make(threshold=3)
    assert not b.failed(1, "HTTP 500", strong=False)
    assert not b.failed(1, "HTTP 500", strong=False)
    b.succeeded(1)  # another client's good reply: the two 500s were about their requests
    assert b.view(1).state is State.CLOSED and b.view(1).failures == 0
    assert not b.failed(1, "HTTP 500", strong=False)
    assert not b.failed(1, "HTTP 500", strong=False)
    assert b.failed(1, "closed the connection mid-reply", strong=False)
    assert b.view(1).state is State.OPEN and b.view(1).reason == "closed the connection mid-reply"


def test_since_does_not_restart_while_the_outage_lasts():
    b, _ = make()
    b.failed(1, "connection refused", strong=True)
    since = b.view(1).since
    time.sleep(0.01)
    for _ in range(3):  # failed probes
        b.failed(1, "connect timeout", strong=True)
    assert b.view(1).since == since and b.view(1).reason == "connect timeout"
    assert b.probe_succeeded(1) is State.HALF_OPEN
    assert b.view(1).since == since  # on trial: still the same outage
    b.failed(1, "HTTP 500", strong=False)  # the trial failed: open again at once, weak or not
    assert b.view(1).state is State.OPEN and b.view(1).since == since


def test_half_open_closes_on_a_good_reply_or_a_second_good_probe():
    b, _ = make()
    b.failed(1, "connection refused", strong=True)
    b.succeeded(1)  # an open breaker is left to its probe (a stream that began before it opened)
    assert b.view(1).state is State.OPEN
    assert b.probe_succeeded(1) is State.HALF_OPEN
    assert not b.is_open(1)  # on trial: requests go there again
    b.succeeded(1)
    assert b.view(1).state is State.CLOSED and b.view(1).since is None
    b.failed(2, "connection refused", strong=True)
    assert b.probe_succeeded(2) is State.HALF_OPEN
    assert b.probe_succeeded(2) is State.CLOSED
    assert b.snapshot() == {}


def test_forget_and_reset():
    b, _ = make()
    b.failed(1, "x", strong=True)
    b.failed(2, "y", strong=True)
    b.reset(1)
    assert b.view(1).state is State.CLOSED and set(b.snapshot()) == {2}
    b.forget()
    assert b.snapshot() == {}


@given(st.lists(st.sampled_from(["strong", "weak", "ok", "probe"]), max_size=40))
def test_any_sequence_keeps_the_invariants(events):
    """Open exactly when the rules say; `since` set exactly while not closed; never restarted."""
    b, _ = make(threshold=3)
    weak_run = 0
    expected = State.CLOSED
    first_since: float | None = None
    for event in events:
        if event == "strong":
            b.failed(7, "r", strong=True)
            expected, weak_run = State.OPEN, 0
        elif event == "weak":
            b.failed(7, "r", strong=False)
            weak_run += 1
            if expected is State.HALF_OPEN or (expected is State.CLOSED and weak_run >= 3):
                expected = State.OPEN
        elif event == "ok":
            b.succeeded(7)
            if expected is not State.OPEN:
                expected, weak_run = State.CLOSED, 0
        else:
            b.probe_succeeded(7)
            if expected is State.OPEN:
                expected = State.HALF_OPEN
            elif expected is State.HALF_OPEN:
                expected, weak_run = State.CLOSED, 0
        view = b.view(7)
        assert view.state is expected
        assert (view.since is None) == (expected is State.CLOSED)
        if expected is State.CLOSED:
            first_since = None
        elif first_since is None:
            first_since = view.since
        else:
            assert view.since == first_since


# -- what failures say -----------------------------------------------------------------
def test_the_verdicts():
    assert failures.verdict(Failure.REFUSED) == failures.Verdict(Evidence.STRONG, failover=True)
    assert failures.verdict(Failure.CONNECT_TIMEOUT) == failures.Verdict(Evidence.STRONG, failover=True)
    # the work may be running: never resent, never held against the server
    assert failures.verdict(Failure.FIRST_BYTE_TIMEOUT) == failures.Verdict(Evidence.NONE, failover=False)
    assert failures.verdict(Failure.DISCONNECTED).evidence is Evidence.WEAK
    assert all(failures.verdict(f) for f in Failure)  # every kind has a verdict


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422, 429, 499])
def test_a_4xx_is_about_the_request(status):
    assert failures.status_verdict(status) == failures.Verdict(Evidence.NONE, failover=False)


@pytest.mark.parametrize(
    "status,failover", [(500, False), (501, False), (504, False), (502, True), (503, True)]
)
def test_a_5xx_is_weak_evidence_and_fails_over_only_when_the_work_was_not_taken(status, failover):
    assert failures.status_verdict(status) == failures.Verdict(Evidence.WEAK, failover=failover)


def test_closed_before_reply_is_a_closed_connection_not_a_failed_connect():
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert failures.closed_before_reply(aiohttp.ServerDisconnectedError())
    assert failures.closed_before_reply(aiohttp.ClientOSError(errno.ECONNRESET, "reset by peer"))
    assert not failures.closed_before_reply(refused)
    assert not failures.closed_before_reply(aiohttp.SocketTimeoutError("no first byte"))
    assert not failures.closed_before_reply(aiohttp.ConnectionTimeoutError("connect"))
    assert failures.classify(refused) is Failure.REFUSED
    assert failures.classify(aiohttp.SocketTimeoutError("x")) is Failure.FIRST_BYTE_TIMEOUT
