"""The in-process Prometheus histogram: one bucket per observation, cumulative when rendered."""

from __future__ import annotations

from routing.observability import metrics


def _rendered(hist: metrics.Histogram) -> dict[str, float]:
    lines = [line for line in hist.render() if not line.startswith("#")]
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines)}


def test_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    hist = metrics.Histogram("t_seconds", "test")
    metrics._registry.remove(hist)  # keep the process's /metrics output unchanged
    observed = (0.0005, 0.001, 0.003, 0.003, 7.0, 1000.0)
    for seconds in observed:
        hist.observe(seconds, route="/x")
    out = _rendered(hist)

    def bucket(le: str) -> float:
        return out[f't_seconds_bucket{{instance="{metrics.INSTANCE}",route="/x",le="{le}"}}']

    assert bucket("0.001") == 2  # 0.0005 and exactly 0.001 (le means <=)
    assert bucket("0.0025") == 2
    assert bucket("0.005") == 4
    assert bucket("5") == 4
    assert bucket("10") == 5
    assert bucket("300") == 5
    assert bucket("+Inf") == 6  # 1000 s lands only in +Inf
    counts = [bucket(f"{b:g}") for b in metrics.Histogram.BUCKETS] + [bucket("+Inf")]
    assert counts == sorted(counts)
    assert out[f't_seconds_count{{instance="{metrics.INSTANCE}",route="/x"}}'] == 6
    assert out[f't_seconds_sum{{instance="{metrics.INSTANCE}",route="/x"}}'] == sum(observed)


def test_counter_values_are_rendered_exactly() -> None:
    counter = metrics.Counter("t_tokens_total", "test")
    metrics._registry.remove(counter)
    counter.inc(12_345_678, direction="input")
    counter.inc(0.25, direction="output")
    lines = [line for line in counter.render() if not line.startswith("#")]
    assert f't_tokens_total{{instance="{metrics.INSTANCE}",direction="input"}} 12345678' in lines
    assert f't_tokens_total{{instance="{metrics.INSTANCE}",direction="output"}} 0.25' in lines


def test_numbers_are_rendered_the_way_prometheus_reads_them() -> None:
    assert [metrics._num(v) for v in (5, 5.0, 0.25, 12_345_678.0)] == ["5", "5", "0.25", "12345678"]
    assert [metrics._num(v) for v in (float("inf"), float("-inf"), float("nan"))] == ["+Inf", "-Inf", "NaN"]
