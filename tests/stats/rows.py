"""Time-series rows written straight into the table, for the query and roll-up tests."""

from __future__ import annotations

from datetime import datetime

from stats.models import TokenTimeSeries


def minute_row(endpoint: str, model: str, at: datetime, inp: int, out: int, req: int = 1) -> TokenTimeSeries:
    return TokenTimeSeries.objects.create(
        endpoint=endpoint,
        model=model,
        timestamp=at,
        input_tokens=inp,
        output_tokens=out,
        total_tokens=inp + out,
        requests=req,
    )
