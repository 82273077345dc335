"""Folding old minute rows of the time series into one row per UTC day.

Design (so totals never change, and running it again is harmless):

- Rows are *moved*, never copied. In one transaction every `TokenTimeSeries` row older
  than the cutoff is added to its day's `TokenDaily` row (an upsert that increments) and
  deleted. A row is therefore in exactly one of the two tables, /api/stats and the CSV
  export read both, and every sum over whole days stays the same. A second run finds
  nothing left to fold.
- The cutoff is a UTC midnight: `--days 30` folds the days that ended at least 30 days
  ago, so a day is never split between the tables by the roll-up itself.
- Rows that arrive late for an old minute (a flush retried after a database outage)
  stay in the time series until the next run folds them: they are never lost. On
  PostgreSQL the rows are deleted first (`DELETE ... RETURNING`) and only what was
  deleted is added, in one statement, so a concurrent flush cannot slip a row between
  the read and the delete. On SQLite the transaction holds the write lock from its first
  statement, so no other writer commits in between.
- NOMYO Router's `trim_old` flag decided whether folded rows were deleted; without it a
  re-run counted the same rows again. Here folded rows are always deleted, so `trim_old`
  is accepted for compatibility and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from django.db import connection, transaction

from stats.models import TokenDaily, TokenTimeSeries

DEFAULT_DAYS = 30
MAX_DAYS = 36_500  # a century: any longer keeps everything anyway (and would overflow the date)


@dataclass(frozen=True, slots=True)
class RollupResult:
    cutoff: datetime  # rows with timestamp < cutoff were folded
    groups: int  # (endpoint, model, client, requested model, day) rows of TokenDaily created or incremented
    rows: int  # TokenTimeSeries rows folded (and deleted)
    dry_run: bool = False


def cutoff_for(days: int, now: datetime | None = None) -> datetime:
    """The UTC midnight that starts the first day not yet `days` days old.
    Raises ValueError unless 1 <= days <= MAX_DAYS."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be a whole number from 1 to {MAX_DAYS}")
    moment = (now or datetime.now(tz=UTC)).astimezone(UTC) - timedelta(days=days)
    return datetime.combine(moment.date(), time(0), tzinfo=UTC)


def roll_up(days: int = DEFAULT_DAYS, *, now: datetime | None = None, dry_run: bool = False) -> RollupResult:
    """Fold minute rows of the days that ended at least `days` days ago into TokenDaily."""
    cutoff = cutoff_for(days, now)
    if dry_run:
        return _count(cutoff)
    vendor = connection.vendor
    with transaction.atomic():
        if vendor == "postgresql":
            groups, rows = _fold_postgresql(cutoff)
        elif vendor == "sqlite":
            groups, rows = _fold_sqlite(cutoff)
        else:  # pragma: no cover - the project supports SQLite and PostgreSQL
            raise NotImplementedError(f"roll-up is not implemented for {vendor}")
    return RollupResult(cutoff, groups, rows)


def _tables() -> tuple[str, str, str]:
    q = connection.ops.quote_name
    return q(TokenTimeSeries._meta.db_table), q(TokenDaily._meta.db_table), q("timestamp")


def _fold_postgresql(cutoff: datetime) -> tuple[int, int]:
    ts, daily, stamp = _tables()
    sql = (
        f"WITH moved AS ("
        f" DELETE FROM {ts} WHERE {stamp} < %s"
        f" RETURNING endpoint, model, client, requested_model, input_tokens, output_tokens, total_tokens,"
        f" requests, {stamp}"
        f"), grouped AS ("
        f" SELECT endpoint, model, client, requested_model, ({stamp} AT TIME ZONE 'UTC')::date AS day,"
        f" SUM(input_tokens) AS i, SUM(output_tokens) AS o, SUM(total_tokens) AS t,"
        f" SUM(requests) AS r, COUNT(*) AS n"
        f" FROM moved GROUP BY endpoint, model, client, requested_model, day"
        f"), upserted AS ("
        f" INSERT INTO {daily}"
        f" (endpoint, model, client, requested_model, day, input_tokens, output_tokens, total_tokens,"
        f" requests)"
        f" SELECT endpoint, model, client, requested_model, day, i, o, t, r FROM grouped"
        f" ON CONFLICT (model, day, endpoint, client, requested_model) DO UPDATE SET"
        f" input_tokens = {daily}.input_tokens + excluded.input_tokens,"
        f" output_tokens = {daily}.output_tokens + excluded.output_tokens,"
        f" total_tokens = {daily}.total_tokens + excluded.total_tokens,"
        f" requests = {daily}.requests + excluded.requests"
        f" RETURNING 1"
        f") SELECT (SELECT COUNT(*) FROM upserted), (SELECT COALESCE(SUM(n), 0) FROM grouped)"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [cutoff])
        groups, rows = cursor.fetchone()
    return int(groups), int(rows)


def _fold_sqlite(cutoff: datetime) -> tuple[int, int]:
    ts, daily, stamp = _tables()
    bound = connection.ops.adapt_datetimefield_value(cutoff)
    with connection.cursor() as cursor:
        # A write statement first: the transaction takes the write lock before it reads.
        # (The WHERE clause also keeps SQLite's upsert-after-SELECT syntax unambiguous.)
        cursor.execute(
            f"INSERT INTO {daily}"
            f" (endpoint, model, client, requested_model, day, input_tokens, output_tokens,"
            f" total_tokens, requests)"
            f" SELECT endpoint, model, client, requested_model, date({stamp}), SUM(input_tokens),"
            f" SUM(output_tokens), SUM(total_tokens), SUM(requests)"
            f" FROM {ts} WHERE {stamp} < %s GROUP BY endpoint, model, client, requested_model,"
            f" date({stamp})"
            f" ON CONFLICT (model, day, endpoint, client, requested_model) DO UPDATE SET"
            f" input_tokens = {daily}.input_tokens + excluded.input_tokens,"
            f" output_tokens = {daily}.output_tokens + excluded.output_tokens,"
            f" total_tokens = {daily}.total_tokens + excluded.total_tokens,"
            f" requests = {daily}.requests + excluded.requests",
            [bound],
        )
        groups = cursor.rowcount
        cursor.execute(f"DELETE FROM {ts} WHERE {stamp} < %s", [bound])
        rows = cursor.rowcount
    return max(groups, 0), max(rows, 0)


def _count(cutoff: datetime) -> RollupResult:
    ts, _daily, stamp = _tables()
    day = f"({stamp} AT TIME ZONE 'UTC')::date" if connection.vendor == "postgresql" else f"date({stamp})"
    bound = connection.ops.adapt_datetimefield_value(cutoff)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*), COALESCE(SUM(n), 0) FROM"
            f" (SELECT COUNT(*) AS n FROM {ts} WHERE {stamp} < %s"
            f" GROUP BY endpoint, model, client, requested_model, {day}) AS g",
            [bound],
        )
        groups, rows = cursor.fetchone()
    return RollupResult(cutoff, int(groups), int(rows), dry_run=True)
