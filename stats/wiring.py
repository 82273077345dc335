"""How stats plugs into routing, installed once from `StatsConfig.ready`.

routing never imports stats. Instead stats installs its recorder as an accounting sink
(routing/engine/accounting.py), connects its publisher to routing's change signals
(the board, the breakers, the fleet's models) and its own recorder's, and gives the lifecycle
its start-up, background and shutdown work. Installing twice changes nothing.
"""

from __future__ import annotations

from django.conf import settings

from routing.engine.accounting import sinks
from routing.engine.board import board
from routing.fleet import health
from routing.fleet.breaker import breakers
from routing.server.lifecycle import lifecycle
from stats.publisher import publisher
from stats.recorder import recorder


async def run_recorder() -> None:
    """The recorder's flush loop, every ROUTER_FLUSH_INTERVAL seconds."""
    await recorder.run(settings.ROUTER_FLUSH_INTERVAL)


def install() -> None:
    sinks.install(recorder)
    for signal in (board.changed, breakers.changed, health.models_changed, recorder.changed):
        signal.connect(publisher.notify)
    lifecycle.on_prepare(recorder.load_totals)
    lifecycle.background(run_recorder)
    lifecycle.background(publisher.run)
    lifecycle.on_shutdown(recorder.flush)
