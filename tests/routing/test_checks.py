"""Configuration mistakes reported by `manage.py check` (routing/checks.py)."""

from __future__ import annotations

from django.test import override_settings

from routing.checks import affinity_settings, router_settings


def ids() -> list[str]:
    return [str(problem.id) for problem in affinity_settings(None)]


def test_the_default_affinity_settings_pass() -> None:
    assert ids() == []


def test_it_reports_affinity_bounds_that_cannot_work() -> None:
    with override_settings(ROUTER_AFFINITY_TTL=0, ROUTER_AFFINITY_MAX=0, ROUTER_AFFINITY_WAIT=-1):
        assert ids() == ["routing.E030", "routing.E031", "routing.E032"]


def test_it_warns_when_the_affinity_wait_is_not_shorter_than_the_queue_timeout() -> None:
    with override_settings(ROUTER_AFFINITY_WAIT=60, ROUTER_QUEUE_TIMEOUT=60):
        assert ids() == ["routing.W030"]
    with override_settings(ROUTER_AFFINITY=False, ROUTER_AFFINITY_WAIT=60, ROUTER_QUEUE_TIMEOUT=60):
        assert ids() == []


def test_a_negative_fallback_wait_is_an_error() -> None:
    with override_settings(ROUTER_FALLBACK_WAIT=-1):
        assert [p.id for p in router_settings(None)] == ["routing.E004"]
    with override_settings(ROUTER_FALLBACK_WAIT=0):  # no wait at all: move on at once
        assert router_settings(None) == []
