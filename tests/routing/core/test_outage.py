"""Failures logged once, timeouts suspend calls (routing/core/outage.py)."""

from __future__ import annotations

import logging

from redis.exceptions import TimeoutError as RedisTimeout

from routing.core import outage


def test_a_failure_is_logged_once_until_it_works_again(caplog):
    o = outage.Outage(logging.getLogger("test.outage"), "could not reach it")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(5):
            o.failed(ConnectionRefusedError("refused"))
        o.ok()
        o.ok()
        o.failed(ConnectionRefusedError("refused"))
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO", "WARNING"]


def test_a_refused_connection_suspends_nothing_and_a_success_ends_a_suspension(monkeypatch):
    o = outage.Outage(logging.getLogger("test.outage"), "could not reach it")
    o.failed(ConnectionRefusedError("refused"))
    assert o.down and not o.suspended()
    o.failed(RedisTimeout("Timeout reading from socket"))  # redis-py's own TimeoutError
    assert o.suspended()
    o.ok()
    assert not o.down and not o.suspended()
    o.failed(TimeoutError())
    monkeypatch.setattr(outage, "RETRY_AFTER", 0.0)
    assert not o.suspended()  # RETRY_AFTER passed: asked again
