"""Configuration mistakes reported by `manage.py check` (routing/checks.py)."""

from __future__ import annotations

from routing.checks import router_settings


def test_a_negative_fallback_wait_is_an_error(settings) -> None:
    settings.ROUTER_FALLBACK_WAIT = -1
    assert [p.id for p in router_settings(None)] == ["routing.E004"]
    settings.ROUTER_FALLBACK_WAIT = 0  # no wait at all: move on at once
    assert router_settings(None) == []
