"""Time-series reads for the page's charts: buckets sized to the range."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

from django.db.models import Sum
from django.db.models.functions import TruncDay, TruncHour, TruncMinute

from stats.models import TokenDaily, TokenTimeSeries

TRUNC = {"hour": TruncMinute, "day": TruncHour, "week": TruncHour, "month": TruncDay}
ROLLED_UP = {"week", "month"}  # ranges long enough to reach rolled-up days


def series(start: datetime, end: datetime, range_name: str) -> dict[str, Any]:
    trunc = TRUNC[range_name]
    # Served by the timestamp index (WHERE timestamp >= %s AND timestamp < %s).
    rows = (
        TokenTimeSeries.objects.filter(timestamp__gte=start, timestamp__lt=end)
        .annotate(bucket=trunc("timestamp"))
        .values("bucket")
        .annotate(input=Sum("input_tokens"), output=Sum("output_tokens"))
        .order_by("bucket")
    )
    buckets: dict[datetime, list[int]] = {}
    for r in rows:
        buckets[r["bucket"]] = [r["input"] or 0, r["output"] or 0]
    by_endpoint: dict[str, int] = {}
    for row in (
        TokenTimeSeries.objects.filter(timestamp__gte=start, timestamp__lt=end)
        .values("endpoint")
        .annotate(total=Sum("total_tokens"))
    ):
        by_endpoint[row["endpoint"]] = by_endpoint.get(row["endpoint"], 0) + (row["total"] or 0)
    if range_name in ROLLED_UP:
        # Minute rows older than the retention window are folded into days (stats/rollup.py);
        # those days still belong in the chart, as one point at the start of each UTC day.
        daily = TokenDaily.objects.filter(day__gte=start.date(), day__lt=end.date())
        for row in daily.values("day").annotate(input=Sum("input_tokens"), output=Sum("output_tokens")):
            moment = datetime.combine(row["day"], time.min, tzinfo=UTC)
            point = buckets.setdefault(moment, [0, 0])
            point[0] += row["input"] or 0
            point[1] += row["output"] or 0
        for row in daily.values("endpoint").annotate(total=Sum("total_tokens")):
            by_endpoint[row["endpoint"]] = by_endpoint.get(row["endpoint"], 0) + (row["total"] or 0)
    return {
        "range": range_name,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "points": [
            {"t": moment.astimezone(UTC).isoformat(), "input": v[0], "output": v[1]}
            for moment, v in sorted(buckets.items())
        ],
        "by_endpoint": [{"endpoint": e, "total": t} for e, t in sorted(by_endpoint.items())],
    }
