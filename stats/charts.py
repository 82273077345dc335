"""Time-series reads for the page's charts: buckets sized to the range."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Sum
from django.db.models.functions import TruncDay, TruncHour, TruncMinute

from stats.models import TokenDaily, TokenTimeSeries

TRUNC = {"hour": TruncMinute, "day": TruncHour, "week": TruncHour, "month": TruncDay}


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
    points = [
        {"t": r["bucket"].isoformat(), "input": r["input"] or 0, "output": r["output"] or 0} for r in rows
    ]
    by_endpoint: dict[str, int] = {}
    for row in (
        TokenTimeSeries.objects.filter(timestamp__gte=start, timestamp__lt=end)
        .values("endpoint")
        .annotate(total=Sum("total_tokens"))
    ):
        by_endpoint[row["endpoint"]] = by_endpoint.get(row["endpoint"], 0) + (row["total"] or 0)
    if range_name == "month":
        # Rolled-up days still belong in a month's chart.
        for row in (
            TokenDaily.objects.filter(day__gte=start.date(), day__lt=end.date())
            .values("endpoint")
            .annotate(total=Sum("total_tokens"))
        ):
            by_endpoint[row["endpoint"]] = by_endpoint.get(row["endpoint"], 0) + (row["total"] or 0)
    return {
        "range": range_name,
        "points": points,
        "by_endpoint": [{"endpoint": e, "total": t} for e, t in sorted(by_endpoint.items())],
    }
