from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest

from routing.auth.principal import ANONYMOUS
from routing.engine.accounting import Counts as StreamCounts
from stats import queries
from stats.models import TokenDaily, TokenTimeSeries, TokenTotal
from stats.queries import QueryError
from stats.recorder import recorder
from tests.stats.rows import minute_row as series

T0 = datetime(2025, 3, 10, 0, 0, tzinfo=UTC)
EP1 = "http://a:11434"
EP2 = "http://b:11434"


@pytest.fixture(autouse=True)
def clean_recorder() -> Iterator[None]:
    recorder.clear()
    yield
    recorder.clear()


def daily(endpoint: str, model: str, day: date, inp: int, out: int, req: int = 1) -> TokenDaily:
    return TokenDaily.objects.create(
        endpoint=endpoint,
        model=model,
        day=day,
        input_tokens=inp,
        output_tokens=out,
        total_tokens=inp + out,
        requests=req,
    )


# -- parameters ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-03-10T12:30:00Z", datetime(2025, 3, 10, 12, 30, tzinfo=UTC)),
        ("2025-03-10T14:30:00+02:00", datetime(2025, 3, 10, 12, 30, tzinfo=UTC)),
        ("2025-03-10T12:30:00", datetime(2025, 3, 10, 12, 30, tzinfo=UTC)),
        ("2025-03-10", datetime(2025, 3, 10, tzinfo=UTC)),
        (1741609800, datetime(2025, 3, 10, 12, 30, tzinfo=UTC)),
        (1741609800.5, datetime(2025, 3, 10, 12, 30, 0, 500000, tzinfo=UTC)),
        ("1741609800", datetime(2025, 3, 10, 12, 30, tzinfo=UTC)),
    ],
)
def test_parse_instant_accepts_iso_and_unix(raw: object, expected: datetime) -> None:
    assert queries.parse_instant(raw, "from") == expected


@pytest.mark.parametrize("raw", [True, None, "yesterday", "2025-13-01", float("nan"), 1e20, [1], {}])
def test_parse_instant_rejects(raw: object) -> None:
    with pytest.raises(QueryError):
        queries.parse_instant(raw, "from")


def test_resolve_range_defaults_to_last_30_days_including_this_minute() -> None:
    now = datetime(2025, 3, 10, 12, 30, 42, tzinfo=UTC)
    start, end = queries.resolve_range(None, None, now=now)
    assert end == datetime(2025, 3, 10, 12, 31, tzinfo=UTC)
    assert start == end - timedelta(days=30)
    start, end = queries.resolve_range("2025-03-01", None, now=now)
    assert start == datetime(2025, 3, 1, tzinfo=UTC)
    with pytest.raises(QueryError, match="earlier"):
        queries.resolve_range("2025-03-02", "2025-03-01")


def test_bucket_defaults_by_range_length_and_limits_points() -> None:
    assert queries.default_bucket(T0, T0 + timedelta(hours=6)) == "minute"
    assert queries.default_bucket(T0, T0 + timedelta(days=1)) == "minute"
    assert queries.default_bucket(T0, T0 + timedelta(days=7)) == "hour"
    assert queries.default_bucket(T0, T0 + timedelta(days=90)) == "day"
    assert queries.choose_bucket(None, T0, T0 + timedelta(days=90)) == "day"
    assert queries.choose_bucket("minute", T0, T0 + timedelta(days=30)) == "minute"  # 43,200 points
    with pytest.raises(QueryError, match="'hour' or 'day'"):
        queries.choose_bucket("minute", T0, T0 + timedelta(days=60))
    with pytest.raises(QueryError, match="bucket"):
        queries.choose_bucket("week", T0, T0 + timedelta(days=1))


def test_daily_days_are_those_whose_midnight_is_in_range() -> None:
    assert queries.daily_days(T0, T0 + timedelta(days=2)) == (date(2025, 3, 10), date(2025, 3, 12))
    assert queries.daily_days(T0 + timedelta(hours=1), T0 + timedelta(days=2, hours=1)) == (
        date(2025, 3, 11),
        date(2025, 3, 13),
    )


# -- time series ---------------------------------------------------------------------
@pytest.mark.django_db
def test_series_buckets_sum_per_endpoint() -> None:
    series(EP1, "llama3", T0 + timedelta(minutes=1), 10, 20)
    series(EP1, "llama3", T0 + timedelta(minutes=59), 1, 2)
    series(EP2, "llama3", T0 + timedelta(minutes=30), 5, 5, req=2)
    series(EP1, "llama3", T0 + timedelta(hours=1, minutes=5), 100, 200)
    series(EP1, "other", T0 + timedelta(minutes=1), 999, 999)  # another model: never counted
    series(EP1, "llama3", T0 + timedelta(hours=2), 7, 7)  # at the end: excluded

    points = queries.model_series("llama3", T0, T0 + timedelta(hours=2), "hour")
    got = [(p.timestamp, p.endpoint, p.counts.as_dict()) for p in points]
    assert got == [
        (T0, EP1, {"input_tokens": 11, "output_tokens": 22, "total_tokens": 33, "requests": 2}),
        (T0, EP2, {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10, "requests": 2}),
        (
            T0 + timedelta(hours=1),
            EP1,
            {"input_tokens": 100, "output_tokens": 200, "total_tokens": 300, "requests": 1},
        ),
    ]
    minutes = queries.model_series("llama3", T0, T0 + timedelta(hours=2), "minute")
    assert [p.timestamp for p in minutes] == [
        T0 + timedelta(minutes=1),
        T0 + timedelta(minutes=30),
        T0 + timedelta(minutes=59),
        T0 + timedelta(hours=1, minutes=5),
    ]
    days = queries.model_series("llama3", T0, T0 + timedelta(hours=2), "day")
    assert [(p.timestamp, p.endpoint, p.counts.total_tokens) for p in days] == [(T0, EP1, 333), (T0, EP2, 10)]
    assert all(p.timestamp.tzinfo is not None and p.timestamp.utcoffset() == timedelta(0) for p in days)


@pytest.mark.django_db
@pytest.mark.parametrize("bucket", ["minute", "hour", "day"])
def test_series_totals_are_the_same_for_every_bucket(bucket: queries.Bucket) -> None:
    for i in range(0, 3 * 24 * 60, 37):
        series(EP1 if i % 2 else EP2, "m", T0 + timedelta(minutes=i), i, 1)
    end = T0 + timedelta(days=3)
    stats = queries.model_stats("m", T0, end, bucket)
    expected = sum(i + 1 for i in range(0, 3 * 24 * 60, 37))
    assert stats.range_totals.total_tokens == expected
    assert sum(stats.endpoint_distribution().values()) == expected


@pytest.mark.django_db
def test_series_includes_rolled_up_days_at_their_midnight() -> None:
    daily(EP1, "m", date(2025, 3, 8), 1000, 0, req=10)
    daily(EP1, "m", date(2025, 3, 9), 2000, 0, req=20)
    daily(EP1, "m", date(2025, 3, 7), 4000, 0)  # before the range
    daily(EP1, "x", date(2025, 3, 9), 8000, 0)  # another model
    series(EP1, "m", T0 + timedelta(minutes=5), 3, 0)
    points = queries.model_series("m", datetime(2025, 3, 8, tzinfo=UTC), T0 + timedelta(hours=1), "hour")
    assert [(p.timestamp, p.counts.input_tokens, p.counts.requests) for p in points] == [
        (datetime(2025, 3, 8, tzinfo=UTC), 1000, 10),
        (datetime(2025, 3, 9, tzinfo=UTC), 2000, 20),
        (T0, 3, 1),
    ]
    # A range starting after a day's midnight leaves that rolled-up day out.
    later = queries.model_series("m", datetime(2025, 3, 8, 1, tzinfo=UTC), T0 + timedelta(hours=1), "day")
    assert [(p.timestamp.date(), p.counts.input_tokens) for p in later] == [
        (date(2025, 3, 9), 2000),
        (date(2025, 3, 10), 3),
    ]


@pytest.mark.django_db
def test_series_query_reads_the_model_timestamp_index() -> None:
    from django.db import connection

    TokenTimeSeries.objects.bulk_create(
        TokenTimeSeries(endpoint=ep, model=f"m{m}", timestamp=T0 + timedelta(minutes=i), total_tokens=1)
        for i in range(120)
        for m in range(100)
        for ep in (EP1, EP2)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    qs = (
        TokenTimeSeries.objects.filter(model="m3", timestamp__gte=T0, timestamp__lt=T0 + timedelta(hours=1))
        .annotate(bucket=queries.BucketStart("timestamp", "hour"))
        .values_list("bucket", "endpoint")
    )
    plan = qs.explain()
    if connection.vendor == "sqlite":  # SQLite names the unique constraint's index itself
        assert "INDEX sqlite_autoindex_stats_tokentimeseries" in plan, plan
        assert "(model=? AND timestamp>? AND timestamp<?)" in plan, plan
    else:
        assert "tokenseries_model_ts_endpoint" in plan, plan


# -- totals --------------------------------------------------------------------------
@pytest.mark.django_db
def test_pair_totals_add_unflushed_counts() -> None:
    TokenTotal.objects.create(
        endpoint=EP1, model="m", input_tokens=10, output_tokens=5, total_tokens=15, requests=2
    )
    recorder.record(ANONYMOUS, EP1, "m", StreamCounts(prompt=1, completion=2))
    recorder.record(ANONYMOUS, EP2, "m", StreamCounts(prompt=100, completion=0))
    totals = queries.pair_totals()
    assert totals[(EP1, "m")].as_dict() == {
        "input_tokens": 11,
        "output_tokens": 7,
        "total_tokens": 18,
        "requests": 3,
    }
    assert totals[(EP2, "m")].total_tokens == 100
    model = queries.model_totals("m")
    assert model is not None and model.total_tokens == 118 and model.requests == 4
    assert queries.model_totals("never-used") is None


@pytest.mark.django_db
def test_pair_totals_do_not_count_a_flush_twice() -> None:
    recorder.record(ANONYMOUS, EP1, "m", StreamCounts(prompt=4, completion=6))
    before = queries.pair_totals()[(EP1, "m")].total_tokens
    recorder.flush_sync()
    after = queries.pair_totals()[(EP1, "m")].total_tokens
    assert before == after == 10


# -- CSV -----------------------------------------------------------------------------
@pytest.mark.django_db
def test_csv_pages_return_every_row_once_in_order() -> None:
    expected = []
    for minute in range(7):
        for ep in (EP1, EP2):
            for model in ("a", "b", "c"):
                row = series(ep, model, T0 + timedelta(minutes=minute), minute, 1)
                expected.append((row.timestamp, ep, model, minute, 1, minute + 1, 1, "anonymous", ""))
    expected.sort(key=lambda r: (r[0], r[1], r[2]))
    for limit in (1, 4, 6, 7, 100):  # smaller than a minute, not aligned, aligned, larger
        got = []
        after = None
        pages = 0
        while True:
            rows, after = queries.csv_page(T0, T0 + timedelta(hours=1), None, after, limit)
            got.extend(rows)
            pages += 1
            assert pages < 100
            if after is None:
                break
        assert got == expected, limit
    only_a, nxt = queries.csv_page(T0, T0 + timedelta(minutes=2), "a", None, 100)
    assert nxt is None
    assert [(r[0], r[1]) for r in only_a] == [
        (T0, EP1),
        (T0, EP2),
        (T0 + timedelta(minutes=1), EP1),
        (T0 + timedelta(minutes=1), EP2),
    ]


@pytest.mark.django_db
def test_csv_daily_rows() -> None:
    daily(EP1, "a", date(2025, 3, 9), 5, 5)
    daily(EP1, "b", date(2025, 3, 9), 6, 6)
    assert queries.csv_daily_rows(datetime(2025, 3, 9, tzinfo=UTC), T0, "a") == [
        (datetime(2025, 3, 9, tzinfo=UTC), EP1, "a", 5, 5, 10, 1, "anonymous", "")
    ]
    assert len(queries.csv_daily_rows(datetime(2025, 3, 9, tzinfo=UTC), T0, None)) == 2
    assert queries.csv_daily_rows(datetime(2025, 3, 9, 0, 1, tzinfo=UTC), T0, None) == []
