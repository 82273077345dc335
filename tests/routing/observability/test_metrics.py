"""The process's Prometheus exposition (prometheus_client): names, instance label, escaping,
cached label children, histogram buckets, process and lock metrics, collectors passed at scrape.

The exposition is parsed with prometheus_client's own text parser, so a malformed line fails here."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from routing.observability import metrics
from routing.observability.locks import TimedLock


def _samples(*collectors: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render(*collectors).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"instance": metrics.INSTANCE, **labels}.items()))), 0.0)


def test_a_request_counts_once_and_its_duration_lands_in_the_right_buckets() -> None:
    route = "/test/request-done"
    before = _samples()
    metrics.request_done(route, "gpu-a", 200, 0.003)
    metrics.request_done(route, "gpu-a", 200, 0.001)  # exactly on a bound: le means <=
    metrics.request_done(route, "", 404, 1000.0)  # only in +Inf
    after = _samples()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("router_requests_total", route=route, endpoint="gpu-a", status="200") == 2
    assert delta("router_requests_total", route=route, endpoint="", status="404") == 1
    hist = "router_request_duration_seconds"
    assert delta(hist + "_bucket", route=route, le="0.001") == 1
    assert delta(hist + "_bucket", route=route, le="0.005") == 2
    assert delta(hist + "_bucket", route=route, le="300.0") == 2
    assert delta(hist + "_bucket", route=route, le="+Inf") == 3
    assert delta(hist + "_count", route=route) == 3
    assert delta(hist + "_sum", route=route) == 1000.004
    bounds = [float(b) for b in metrics.BUCKETS]
    counts = [_value(after, hist + "_bucket", route=route, le=repr(b)) for b in bounds]
    assert counts == [1, 1] + [2] * (len(bounds) - 2)  # cumulative, as Prometheus reads them


def test_label_children_are_made_once_and_reused() -> None:
    metrics.request_done("/test/cached", "e", 200, 0.01)
    child = metrics._request_children[("/test/cached", "e", 200)]
    metrics.request_done("/test/cached", "e", 200, 0.01)
    assert metrics._request_children[("/test/cached", "e", 200)] is child
    assert child is metrics.requests.labels("/test/cached", "e", "200")  # the library's own child
    metrics.count_tokens("http://t:1", "m", 3, 4)
    pair = metrics._token_children[("http://t:1", "m")]
    metrics.count_tokens("http://t:1", "m", 30, 40)
    assert metrics._token_children[("http://t:1", "m")] is pair
    samples = _samples()
    assert _value(samples, "router_tokens_total", endpoint="http://t:1", model="m", direction="input") == 33
    assert _value(samples, "router_tokens_total", endpoint="http://t:1", model="m", direction="output") == 44


def test_counter_values_are_exact_for_large_token_counts() -> None:
    metrics.count_tokens("http://big:1", "m", 12_345_678, 0)
    samples = _samples()
    labels = {"endpoint": "http://big:1", "model": "m", "direction": "input"}
    assert _value(samples, "router_tokens_total", **labels) == 12_345_678


def test_every_sample_carries_the_instance_and_the_documented_families_are_there() -> None:
    metrics.first_byte("/test/fb", 0.2)
    metrics.queue_wait(0.0)
    text = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "router_requests": "counter",
        "router_tokens": "counter",
        "router_failovers": "counter",
        "router_fresh_connection_retries": "counter",
        "router_upstream_first_byte_seconds": "histogram",
        "router_request_duration_seconds": "histogram",
        "router_queue_wait_seconds": "histogram",
        "router_lock_wait_seconds": "counter",
        "router_lock_wait_max_seconds": "gauge",
        "router_lock_acquisitions": "counter",
        "router_lock_timeouts": "counter",
        "process_cpu_seconds": "counter",
        "process_resident_memory_bytes": "gauge",
    }
    assert {name: families[name].type for name in expected if name in families} == expected
    assert all(s.labels.get("instance") == metrics.INSTANCE for f in families.values() for s in f.samples)
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)
    assert "# TYPE router_requests_total counter" in text  # the 0.0.4 names the README documents


def test_lock_metrics_are_read_at_scrape_time() -> None:
    lock = TimedLock("test-metrics-lock")
    with lock:
        pass
    samples = _samples()
    assert _value(samples, "router_lock_acquisitions_total", lock="test-metrics-lock") == 1
    with lock:
        pass
    assert _value(_samples(), "router_lock_acquisitions_total", lock="test-metrics-lock") == 2


class _Collected(Collector):
    def __init__(self, value: str) -> None:
        self.value = value

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("test_gauge", "a gauge collected at scrape time", labels=["v"])
        family.add_metric([self.value], 1)
        yield family


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_any_label_value_is_escaped_and_reads_back_unchanged(value: str) -> None:
    """Quotes, backslashes, newlines and any other text in a label value (an endpoint name, a
    breaker reason) round-trip through the exposition; the format stays parseable."""
    samples = _samples(_Collected(value))
    assert _value(samples, "test_gauge", v=value) == 1


def test_the_view_serves_the_0_0_4_text_format() -> None:
    assert metrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")
