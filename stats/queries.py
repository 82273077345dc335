"""Reads behind the NOMYO Router-compatible statistics routes (stats/api_views.py).

Plain synchronous functions over the ORM; the async views call them in a worker thread.
Parameter problems raise `QueryError` (a ValueError) with a message meant for the client.

Rows are kept per client (a client key's name, or anonymous / operator); every read sums
over clients unless a `client` is given, which keeps to that client's rows.

Time series come from two tables: `TokenTimeSeries` (one row per endpoint, model, client and UTC
minute) and `TokenDaily` (minute rows older than the retention window, folded into one
row per UTC day by stats/rollup.py). A daily row counts as a point at the start of its
day (00:00 UTC): it is inside a range when that instant is, and it lands in the bucket
that starts then. So folding never changes what a day-aligned range adds up to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from django.db.models import DateTimeField, Sum
from django.db.models.functions import Trunc

from routing.core.names import spellings as model_spellings
from stats.models import TokenDaily, TokenTimeSeries, TokenTotal
from stats.recorder import recorder

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models.sql.compiler import SQLCompiler, _AsSqlType

Bucket = Literal["minute", "hour", "day"]
BUCKETS: dict[str, timedelta] = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
DEFAULT_SPAN = timedelta(days=30)  # no "from": the last 30 days, like NOMYO Router's chart
# Every instant a client gives must lie in this window. Nothing is counted before unix
# time 0, and the margins keep every bucket, day and default-range computation far from
# the limits of Python's datetime (years 1 to 9999), which would otherwise overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
MAX_POINTS = 50_000  # buckets per answer; a finer bucket over a longer range is a 400
CSV_PAGE = 5_000

Pair = tuple[str, str]  # (endpoint url, model)


class QueryError(ValueError):
    """A bad parameter; the message is shown to the client with a 400."""


# -- parameters ----------------------------------------------------------------------
def parse_instant(value: object, name: str) -> datetime:
    """ISO 8601 (naive means UTC; a bare date means its midnight) or unix seconds, as an
    aware UTC datetime in [EARLIEST, LATEST]. Anything else raises QueryError."""
    if isinstance(value, bool) or value is None:
        raise QueryError(f"'{name}' must be an ISO 8601 time or unix seconds")
    window = f"{EARLIEST:%Y-%m-%dT%H:%M:%SZ} and {LATEST:%Y-%m-%dT%H:%M:%SZ}"
    try:
        moment = _instant(value, name)
    except QueryError:
        raise
    except (OverflowError, OSError, ValueError):  # past the ends of Python's calendar
        raise QueryError(f"'{name}' must lie between {window}: {_shown(value)}") from None
    if not EARLIEST <= moment <= LATEST:
        raise QueryError(f"'{name}' must lie between {window}: {_shown(value)}")
    return moment


def _instant(value: object, name: str) -> datetime:
    if isinstance(value, str):
        text = value.strip()
        try:
            number: float | None = float(text)
        except ValueError:
            number = None
        if number is None:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                shown = _shown(value)
                raise QueryError(f"'{name}' is not an ISO 8601 time or unix seconds: {shown}") from None
            # astimezone overflows for a time near year 1 or 9999 with an offset: out of range
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        value = number
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise QueryError(f"'{name}' must be a finite number of seconds")
        return datetime.fromtimestamp(value, tz=UTC)
    raise QueryError(f"'{name}' must be an ISO 8601 time or unix seconds")


def _shown(value: object) -> str:
    """A client's value in an error message, cut short (a body may carry megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def spellings(model: str) -> list[str]:
    """Every stored name of one model. `llama3` and `llama3:latest` are one model (see
    routing/names.model_key): tokens are recorded under the key, and a client may ask with
    either spelling the model lists show, so a query matches all of them."""
    return model_spellings(model)


def next_minute(now: datetime) -> datetime:
    """The end (exclusive) of a range that includes the current minute."""
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1)


def resolve_range(
    start_raw: object = None, end_raw: object = None, *, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """[start, end) in UTC. Defaults: end = the end of the current minute, start = end - 30 days."""
    end = (
        parse_instant(end_raw, "to")
        if end_raw not in (None, "")
        else next_minute(now or datetime.now(tz=UTC))
    )
    start = parse_instant(start_raw, "from") if start_raw not in (None, "") else end - DEFAULT_SPAN
    if start >= end:
        raise QueryError("'from' must be earlier than 'to'")
    return start, end


def default_bucket(start: datetime, end: datetime) -> Bucket:
    span = end - start
    if span <= timedelta(days=1):
        return "minute"
    if span <= timedelta(days=31):
        return "hour"
    return "day"


def bucket_count(start: datetime, end: datetime, bucket: Bucket) -> int:
    size = BUCKETS[bucket]
    first = floor_to(start, bucket)
    return max(1, math.ceil((end - first) / size))


def choose_bucket(value: object, start: datetime, end: datetime) -> Bucket:
    """The requested bucket (checked), or one sized to the range."""
    if value in (None, ""):
        return default_bucket(start, end)
    if not isinstance(value, str) or value not in BUCKETS:
        raise QueryError(f"'bucket' must be one of {', '.join(BUCKETS)}")
    bucket = cast(Bucket, value)
    if bucket_count(start, end, bucket) > MAX_POINTS:
        coarser = [b for b in BUCKETS if bucket_count(start, end, cast(Bucket, b)) <= MAX_POINTS]
        hint = f"; use {' or '.join(repr(b) for b in coarser)}" if coarser else "; shorten the range"
        raise QueryError(f"range too long for bucket {bucket!r} (more than {MAX_POINTS} points){hint}")
    return bucket


def floor_to(moment: datetime, bucket: Bucket) -> datetime:
    moment = moment.astimezone(UTC).replace(second=0, microsecond=0)
    if bucket == "minute":
        return moment
    moment = moment.replace(minute=0)
    return moment if bucket == "hour" else moment.replace(hour=0)


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def first_day_at_or_after(moment: datetime) -> date:
    """The first UTC day whose midnight is at or after `moment`."""
    moment = moment.astimezone(UTC)
    day = moment.date()
    return day if moment == day_start(day) else day + timedelta(days=1)


def daily_days(start: datetime, end: datetime) -> tuple[date, date]:
    """[first, last) days whose midnight lies in [start, end)."""
    return first_day_at_or_after(start), first_day_at_or_after(end)


# -- bucketing in SQL ----------------------------------------------------------------
_SQLITE_FORMATS = {"minute": "%Y-%m-%d %H:%M:00", "hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}


class BucketStart(Trunc):
    """The start of the UTC bucket a timestamp falls in.

    PostgreSQL uses Django's date_trunc. On SQLite, Django's Trunc calls a Python
    function per row; timestamps are stored there as UTC text, so a native strftime
    gives the same answer several times faster.
    """

    def __init__(self, expression: str, kind: Bucket) -> None:
        super().__init__(expression, kind, output_field=DateTimeField(), tzinfo=UTC)

    def as_sqlite(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra_context: Any
    ) -> _AsSqlType:
        sql, params = compiler.compile(self.lhs)
        return f"strftime(%s, {sql})", (_SQLITE_FORMATS[self.kind], *params)

    def convert_value(self, value: Any, expression: Any, connection: BaseDatabaseWrapper) -> Any:
        # Both backends already hand back aware UTC datetimes here; skip Trunc's re-localising.
        if isinstance(value, datetime) and value.tzinfo is not None and not value.utcoffset():
            return value
        return super().convert_value(value, expression, connection)


# -- results -------------------------------------------------------------------------
@dataclass(slots=True)
class Counts:
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    requests: int = 0

    def add(self, input_tokens: int, output_tokens: int, total_tokens: int, requests: int) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.total_tokens += total_tokens
        self.requests += requests

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "requests": self.requests,
        }


@dataclass(slots=True)
class Point:
    timestamp: datetime  # start of the bucket, UTC
    endpoint: str
    counts: Counts = field(default_factory=Counts)


@dataclass(slots=True)
class ModelStats:
    model: str
    start: datetime
    end: datetime
    bucket: Bucket
    totals: Counts | None  # all time; None when the model was never counted
    points: list[Point]

    @property
    def range_totals(self) -> Counts:
        total = Counts()
        for p in self.points:
            c = p.counts
            total.add(c.input_tokens, c.output_tokens, c.total_tokens, c.requests)
        return total

    def endpoint_distribution(self) -> dict[str, int]:
        """Total tokens per endpoint over the range."""
        dist: dict[str, int] = {}
        for p in self.points:
            dist[p.endpoint] = dist.get(p.endpoint, 0) + p.counts.total_tokens
        return dict(sorted(dist.items()))


# -- totals --------------------------------------------------------------------------
def pair_totals(client: str | None = None) -> dict[Pair, Counts]:
    """All-time totals per (endpoint, model) (of every client, or of `client`): the database plus
    this process's unflushed numbers.

    The database is read fresh (other router processes flush into it), then this
    process's pending numbers are added. A flush that commits in between would be
    counted in both, so the read is repeated when the recorder flushed meanwhile.
    """
    rows: list[tuple[str, str, int, int, int, int]] = []
    pending: dict[Pair, list[int]] = {}
    for _attempt in range(3):
        flushes = recorder.flushes
        qs = TokenTotal.objects.all() if client is None else TokenTotal.objects.filter(client=client)
        rows = list(
            qs.values_list("endpoint", "model", "input_tokens", "output_tokens", "total_tokens", "requests")
        )
        _db, pending = recorder.parts(client)
        if recorder.flushes == flushes:
            break
    merged: dict[Pair, Counts] = {}
    for endpoint, model, inp, out, total, req in rows:
        merged.setdefault((endpoint, model), Counts()).add(inp, out, total, req)
    for pair, (inp, out, req, _incomplete) in pending.items():
        merged.setdefault(pair, Counts()).add(inp, out, inp + out, req)
    return dict(sorted(merged.items()))


def recorder_pair_totals(client: str | None = None) -> dict[Pair, Counts]:
    """The same from memory only (the last database read plus pending): for when the database is down."""
    db, pending = recorder.parts(client)
    merged: dict[Pair, Counts] = {}
    for table in (db, pending):
        for pair, (inp, out, req, _incomplete) in table.items():
            merged.setdefault(pair, Counts()).add(inp, out, inp + out, req)
    return dict(sorted(merged.items()))


def model_totals(model: str, client: str | None = None) -> Counts | None:
    """All-time totals of one model, in any of its spellings (of `client` alone if given); None
    when never counted."""
    names = set(spellings(model))
    found = [c for (_endpoint, m), c in pair_totals(client).items() if m in names]
    if not found:
        return None
    total = Counts()
    for c in found:
        total.add(c.input_tokens, c.output_tokens, c.total_tokens, c.requests)
    return total


# -- time series ---------------------------------------------------------------------
def model_series(
    model: str, start: datetime, end: datetime, bucket: Bucket, client: str | None = None
) -> list[Point]:
    """Tokens of one model (any spelling, see `spellings`) per (bucket, endpoint) over
    [start, end), oldest first.

    The minute rows are read with `WHERE model IN (...) AND timestamp >= %s AND timestamp < %s`,
    a range scan of the (model, timestamp, endpoint) unique index, and summed per bucket
    in SQL. Rolled-up days whose midnight lies in the range are added from TokenDaily.
    """
    names = spellings(model)
    merged: dict[tuple[datetime, str], Counts] = {}
    minutes = TokenTimeSeries.objects.filter(model__in=names, timestamp__gte=start, timestamp__lt=end)
    if client is not None:
        minutes = minutes.filter(client=client)
    rows = (
        minutes.annotate(bucket=BucketStart("timestamp", bucket))
        .values_list("bucket", "endpoint")
        .annotate(
            inp=Sum("input_tokens"), out=Sum("output_tokens"), tot=Sum("total_tokens"), req=Sum("requests")
        )
        .order_by()
    )
    for moment, endpoint, inp, out, tot, req in rows:
        merged.setdefault((moment, endpoint), Counts()).add(inp or 0, out or 0, tot or 0, req or 0)
    first, last = daily_days(start, end)
    if first < last:
        days = TokenDaily.objects.filter(model__in=names, day__gte=first, day__lt=last)
        if client is not None:
            days = days.filter(client=client)
        daily = days.values_list(
            "day", "endpoint", "input_tokens", "output_tokens", "total_tokens", "requests"
        )
        for day, endpoint, inp, out, tot, req in daily:
            merged.setdefault((day_start(day), endpoint), Counts()).add(inp, out, tot, req)
    return [Point(moment, endpoint, counts) for (moment, endpoint), counts in sorted(merged.items())]


def model_stats(
    model: str, start: datetime, end: datetime, bucket: Bucket, client: str | None = None
) -> ModelStats:
    """Totals and series of one model (of `client` alone if given)."""
    return ModelStats(
        model,
        start,
        end,
        bucket,
        model_totals(model, client),
        model_series(model, start, end, bucket, client),
    )


# -- CSV export ----------------------------------------------------------------------
# timestamp, endpoint, model, in, out, total, requests, client, requested model ("": the same)
CsvRow = tuple[datetime, str, str, int, int, int, int, str, str]

CSV_FIELDS = (  # the time-series columns of a CSV row, in order (also its header)
    "timestamp",
    "endpoint",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "requests",
    "client",
    "requested_model",
)


def csv_page(
    start: datetime,
    end: datetime,
    model: str | None,
    after: datetime | None,
    limit: int | None = None,
    client: str | None = None,
) -> tuple[list[CsvRow], datetime | None]:
    """Minute rows in [start, end) with timestamp > `after` (of `client` alone if given), ordered
    by (timestamp, endpoint, model, client, requested model).

    Returns the rows and the `after` of the next page (None when this was the last).
    A page always ends at a whole minute, so paging by timestamp loses nothing.
    """
    limit = CSV_PAGE if limit is None else limit
    qs = TokenTimeSeries.objects.filter(timestamp__lt=end)
    qs = qs.filter(timestamp__gt=after) if after is not None else qs.filter(timestamp__gte=start)
    if model is not None:
        qs = qs.filter(model__in=spellings(model))
    if client is not None:
        qs = qs.filter(client=client)
    ordered = qs.order_by("timestamp", "endpoint", "model", "client", "requested_model").values_list(
        *CSV_FIELDS
    )
    rows = cast(list[CsvRow], list(ordered[:limit]))
    if len(rows) < limit:
        return rows, None
    last = rows[-1][0]
    kept = [r for r in rows if r[0] != last]
    if not kept:  # one minute holds more than a page: take that minute whole
        kept = cast(list[CsvRow], list(ordered.filter(timestamp=last)))
        return kept, last
    return kept, kept[-1][0]


def csv_daily_rows(
    start: datetime, end: datetime, model: str | None, client: str | None = None
) -> list[CsvRow]:
    """Rolled-up days in the range (of `client` alone if given), as rows at their day's midnight,
    in CSV order."""
    first, last = daily_days(start, end)
    if first >= last:
        return []
    qs = TokenDaily.objects.filter(day__gte=first, day__lt=last)
    if model is not None:
        qs = qs.filter(model__in=spellings(model))
    if client is not None:
        qs = qs.filter(client=client)
    ordered = qs.order_by("day", "endpoint", "model", "client", "requested_model")
    # the CSV columns, the day in place of the timestamp
    return [
        (day_start(day), endpoint, m, inp, out, tot, req, who, asked)
        for day, endpoint, m, inp, out, tot, req, who, asked in ordered.values_list("day", *CSV_FIELDS[1:])
    ]
