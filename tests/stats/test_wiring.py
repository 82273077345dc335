"""What the apps' ready() installed, exactly once: routing's MetricsSink and the registry's two
receivers (routing/server/wiring.py); stats' recorder as an accounting sink, the publisher on
the four change signals, and the recorder's and publisher's lifecycle hooks (stats/wiring.py).
Installing again (a second ready(), as in some test runners) changes nothing."""

from __future__ import annotations

from django.apps import apps

from routing.engine.accounting import metrics_sink, sinks
from routing.engine.board import board
from routing.fleet import health
from routing.fleet.breaker import breakers
from routing.fleet.registry import registry
from routing.server import wiring as routing_wiring
from routing.server.lifecycle import lifecycle
from stats import wiring as stats_wiring
from stats.publisher import publisher
from stats.recorder import recorder

SIGNALS = (board.changed, breakers.changed, health.models_changed, recorder.changed)


def installed() -> tuple[object, ...]:
    return (
        sinks.installed,
        tuple(s.receivers for s in SIGNALS),
        registry.reloaded.receivers,
        tuple(lifecycle._prepare),
        tuple(lifecycle._background),
        tuple(lifecycle._shutdown),
    )


def test_ready_installed_each_piece_once():
    assert sinks.installed.count(metrics_sink) == 1
    assert sinks.installed.count(recorder) == 1
    for signal in SIGNALS:
        assert signal.receivers.count(publisher.notify) == 1, signal
    assert registry.reloaded.receivers == (routing_wiring._limits_follow, routing_wiring._caches_follow)
    assert lifecycle._prepare.count(recorder.load_totals) == 1
    assert lifecycle._background.count(stats_wiring.run_recorder) == 1
    assert lifecycle._background.count(publisher.run) == 1
    assert lifecycle._shutdown.count(recorder.flush) == 1


def test_installing_again_changes_nothing():
    before = installed()
    routing_wiring.install()
    stats_wiring.install()
    apps.get_app_config("routing").ready()
    apps.get_app_config("stats").ready()
    assert installed() == before


def test_each_signal_marks_the_publisher_dirty(monkeypatch):
    for signal in SIGNALS:
        monkeypatch.setattr(publisher, "_dirty", False)
        signal.send()
        assert publisher._dirty, signal
