from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db.models import Sum

from stats import queries
from stats.models import TokenDaily, TokenTimeSeries
from stats.rollup import cutoff_for, roll_up
from tests.stats.rows import minute_row

NOW = datetime(2025, 5, 1, 15, 30, tzinfo=UTC)
EP1 = "http://a:11434"
EP2 = "http://b:11434"


def fill() -> None:
    """Rows every 7 hours over the last 45 days, two endpoints, two models."""
    at = NOW - timedelta(days=45)
    i = 0
    while at < NOW:
        minute_row(
            EP1 if i % 3 else EP2, "llama3" if i % 2 else "qwen", at.replace(second=0), i, 2 * i, 1 + i % 4
        )
        at += timedelta(hours=7, minutes=13)
        i += 1


def grand_totals() -> tuple[int, int, int, int]:
    def sums(model: type[TokenTimeSeries] | type[TokenDaily]) -> list[int]:
        agg = model.objects.aggregate(
            i=Sum("input_tokens"), o=Sum("output_tokens"), t=Sum("total_tokens"), r=Sum("requests")
        )
        return [agg[k] or 0 for k in ("i", "o", "t", "r")]

    a, b = sums(TokenTimeSeries), sums(TokenDaily)
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


def seen_by_stats(model: str, bucket: queries.Bucket) -> dict[tuple[datetime, str], int]:
    start = datetime(2025, 3, 1, tzinfo=UTC)  # a midnight before every row
    end = datetime(2025, 5, 2, tzinfo=UTC)
    series = queries.model_series(model, start, end, bucket)
    by_day: dict[tuple[datetime, str], int] = {}
    for p in series:
        key = (queries.floor_to(p.timestamp, "day"), p.endpoint)
        by_day[key] = by_day.get(key, 0) + p.counts.total_tokens
    return by_day


def test_cutoff_is_a_utc_midnight_days_ago() -> None:
    assert cutoff_for(30, NOW) == datetime(2025, 4, 1, tzinfo=UTC)
    assert cutoff_for(1, datetime(2025, 5, 1, 0, 0, tzinfo=UTC)) == datetime(2025, 4, 30, tzinfo=UTC)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            cutoff_for(bad, NOW)  # type: ignore[arg-type]


@pytest.mark.django_db
def test_rollup_moves_old_rows_and_keeps_every_total() -> None:
    fill()
    before = grand_totals()
    per_day_before = {m: seen_by_stats(m, "day") for m in ("llama3", "qwen")}
    per_hour_before = {m: seen_by_stats(m, "hour") for m in ("llama3", "qwen")}
    old_rows = TokenTimeSeries.objects.filter(timestamp__lt=datetime(2025, 4, 1, tzinfo=UTC)).count()
    assert old_rows > 0

    result = roll_up(30, now=NOW)

    assert result.cutoff == datetime(2025, 4, 1, tzinfo=UTC)
    assert result.rows == old_rows
    assert result.groups == TokenDaily.objects.count() > 0
    assert not TokenTimeSeries.objects.filter(timestamp__lt=result.cutoff).exists()
    assert not TokenDaily.objects.filter(day__gte=date(2025, 4, 1)).exists()
    assert grand_totals() == before
    for m in ("llama3", "qwen"):
        assert seen_by_stats(m, "day") == per_day_before[m]
        assert seen_by_stats(m, "hour") == per_hour_before[m]  # same per day; hours merge at midnight

    again = roll_up(30, now=NOW)  # nothing left to fold: idempotent
    assert (again.groups, again.rows) == (0, 0)
    assert grand_totals() == before


@pytest.mark.django_db
def test_rollup_increments_existing_days_and_folds_late_rows() -> None:
    day = datetime(2025, 3, 20, tzinfo=UTC)
    minute_row(EP1, "m", day + timedelta(hours=1), 10, 1)
    minute_row(EP1, "m", day + timedelta(hours=23, minutes=59), 20, 2, req=3)
    minute_row(EP2, "m", day + timedelta(hours=2), 5, 0)
    first = roll_up(30, now=NOW)
    assert (first.groups, first.rows) == (2, 3)
    row = TokenDaily.objects.get(endpoint=EP1, model="m", day=date(2025, 3, 20))
    assert (row.input_tokens, row.output_tokens, row.total_tokens, row.requests) == (30, 3, 33, 4)

    # A flush retried long after an outage writes a row for a day already folded.
    minute_row(EP1, "m", day + timedelta(hours=5), 100, 0)
    second = roll_up(30, now=NOW)
    assert (second.groups, second.rows) == (1, 1)
    row.refresh_from_db()
    assert (row.input_tokens, row.total_tokens, row.requests) == (130, 133, 5)
    assert TokenDaily.objects.get(endpoint=EP2, day=date(2025, 3, 20)).total_tokens == 5


@pytest.mark.django_db
def test_rollup_keeps_the_day_that_is_not_old_enough_whole() -> None:
    minute_row(EP1, "m", datetime(2025, 3, 31, 23, 59, tzinfo=UTC), 1, 0)
    minute_row(EP1, "m", datetime(2025, 4, 1, 0, 0, tzinfo=UTC), 2, 0)
    minute_row(EP1, "m", datetime(2025, 4, 1, 10, 0, tzinfo=UTC), 4, 0)  # more than 30 days old too
    result = roll_up(30, now=NOW)
    assert result.rows == 1
    assert TokenTimeSeries.objects.count() == 2
    assert TokenDaily.objects.get().day == date(2025, 3, 31)


@pytest.mark.django_db
def test_dry_run_changes_nothing() -> None:
    fill()
    rows = TokenTimeSeries.objects.count()
    result = roll_up(30, now=NOW, dry_run=True)
    assert result.dry_run and result.rows > 0 and result.groups > 0
    assert TokenTimeSeries.objects.count() == rows
    assert not TokenDaily.objects.exists()
    real = roll_up(30, now=NOW)
    assert (real.groups, real.rows) == (result.groups, result.rows)


@pytest.mark.django_db
def test_management_command() -> None:
    old = datetime.now(tz=UTC) - timedelta(days=40)
    minute_row(EP1, "m", old.replace(second=0, microsecond=0), 3, 4)
    minute_row(EP1, "m", datetime.now(tz=UTC).replace(second=0, microsecond=0), 1, 1)
    out = StringIO()
    call_command("aggregate_time_series", "--days", "30", "--dry-run", stdout=out)
    assert "Would fold 1 minute rows into 1 daily rows" in out.getvalue()
    assert TokenTimeSeries.objects.count() == 2
    out = StringIO()
    call_command("aggregate_time_series", "--days", "30", "--trim-old", stdout=out)
    assert "Folded 1 minute rows into 1 daily rows" in out.getvalue()
    assert TokenTimeSeries.objects.count() == 1
    assert TokenDaily.objects.get().total_tokens == 7
    out = StringIO()
    call_command("aggregate_time_series", stdout=out)  # default 30 days; nothing left
    assert "Folded 0 minute rows" in out.getvalue()
    for days in ("0", "100000000"):  # a clear error, not an overflow
        with pytest.raises(CommandError, match="from 1 to 36500"):
            call_command("aggregate_time_series", "--days", days)
