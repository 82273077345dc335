"""The fleet's gauges for /metrics, read from the usage snapshot at scrape time only.

Nothing here runs on the request path: `FleetGauges.collect()` builds one snapshot
(routing/status/snapshot.py, in-process structures only) when Prometheus scrapes and turns it
into six gauge families. Label values (endpoint names, model keys, breaker reasons) are escaped
by prometheus_client; a breaker reason is cut to 200 characters so one long error message
cannot bloat the exposition.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from routing.engine.affinity import Affinity
from routing.engine.board import board
from routing.fleet.breaker import State
from routing.status import snapshot

REASON_CHARS = 200  # longest breaker reason label value


class FleetGauges(Collector):
    """router_in_flight{endpoint,model}, router_queued{model}, router_endpoint_up{endpoint},
    router_endpoint_breaker_state{endpoint,state} (1 for the current state, 0 for the others),
    router_endpoint_breaker_since_seconds{endpoint} (Unix time, 0 when closed) and
    router_endpoint_breaker_reason{endpoint,reason} (1, only for endpoints out of closed); with
    prompt-cache affinity on, router_affinity_choices_total{outcome} (kept, moved, new, waited:
    routing/engine/affinity.py) and router_affinity_remembered (conversations in its memory)."""

    def collect(self) -> Iterator[Metric]:
        snap = snapshot.build()
        in_flight = GaugeMetricFamily(
            "router_in_flight",
            "Requests holding a slot, by endpoint and model.",
            labels=["endpoint", "model"],
        )
        for row in snap["active"]:
            in_flight.add_metric([row["endpoint"], row["model"]], row["count"])
        yield in_flight
        queued = GaugeMetricFamily(
            "router_queued", "Requests waiting for a slot, by model.", labels=["model"]
        )
        for model, n in snap["queued"].items():
            queued.add_metric([model], n)
        yield queued
        up = GaugeMetricFamily(
            "router_endpoint_up",
            "1 when the endpoint is enabled and its breaker is not open.",
            labels=["endpoint"],
        )
        state = GaugeMetricFamily(
            "router_endpoint_breaker_state",
            "1 for the circuit breaker's current state, per endpoint.",
            labels=["endpoint", "state"],
        )
        since = GaugeMetricFamily(
            "router_endpoint_breaker_since_seconds",
            "Unix time the endpoint left closed (0: closed).",
            labels=["endpoint"],
        )
        reason = GaugeMetricFamily(
            "router_endpoint_breaker_reason",
            "The latest evidence against an endpoint out of closed.",
            labels=["endpoint", "reason"],
        )
        for ep in snap["endpoints"]:
            name = ep["name"]
            up.add_metric([name], 1 if ep["enabled"] and ep["breaker"] != State.OPEN.value else 0)
            for s in State:
                state.add_metric([name, s.value], 1 if ep["breaker"] == s.value else 0)
            since.add_metric([name], ep["failing_since"] or 0)
            if ep["failing_since"] is not None:
                reason.add_metric([name, str(ep["failing_reason"])[:REASON_CHARS]], 1)
        yield from (up, state, since, reason)
        strategy = board.strategy
        if isinstance(strategy, Affinity):
            choices = CounterMetricFamily(
                "router_affinity_choices",
                "Prompt-cache affinity's choices for keyed requests: kept the remembered server, "
                "moved elsewhere, new conversation; waited: waits begun for a full remembered server.",
                labels=["outcome"],
            )
            for outcome, n in list(strategy.counts.items()):
                choices.add_metric([outcome], n)
            yield choices
            yield GaugeMetricFamily(
                "router_affinity_remembered",
                "Conversations in prompt-cache affinity's memory.",
                value=len(strategy.memory),
            )


fleet_gauges = FleetGauges()
