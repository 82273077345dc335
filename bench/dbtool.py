"""Database side of `make bench`, run by bench/run.py as a subprocess with DATABASE_URL set.

    python -m bench.dbtool endpoints '[{"name": ..., "url": ..., "kind": ..., "limit": 64}]'
    python -m bench.dbtool fill-series --rows 1000000 --days 58
    python -m bench.dbtool stats-explain --model M --from ISO --to ISO

Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nomyo_site.settings")

import django

django.setup()

from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

MODELS = ["llama3.1:8b", "qwen2.5:7b", "mistral:latest", "gemma2:9b", "phi3:mini"]
ENDPOINTS = [
    "http://gpu-a.example:11434",
    "http://gpu-b.example:11434",
    "http://gpu-c.example:11434",
    "http://llama-cpp.example:8080/v1",
]
PER_MINUTE = 12  # of the 20 (model, endpoint) pairs, this many have a row in each minute


def cmd_endpoints(spec: str) -> dict[str, Any]:
    from routing.models import Endpoint

    wanted = json.loads(spec)
    Endpoint.objects.all().delete()
    for item in wanted:
        Endpoint.objects.create(
            name=item["name"],
            url=item["url"],
            kind=item["kind"],
            max_concurrent_connections=item["limit"],
            enabled=True,
        )
    return {"endpoints": Endpoint.objects.count()}


def _rows(rows: int, end: datetime) -> tuple[io.StringIO, dict[tuple[str, str], list[int]], datetime]:
    """`rows` minute rows ending at `end`, PER_MINUTE per minute, rotating over the pairs."""
    pairs = [(m, e) for m in MODELS for e in ENDPOINTS]
    minutes = -(-rows // PER_MINUTE)
    first = end - timedelta(minutes=minutes - 1)
    buf = io.StringIO()
    totals: dict[tuple[str, str], list[int]] = {}
    written = 0
    for minute in range(minutes):
        stamp = (first + timedelta(minutes=minute)).strftime("%Y-%m-%d %H:%M:00+00")
        for k in range(PER_MINUTE):
            if written == rows:
                break
            model, endpoint = pairs[(minute * 7 + k) % len(pairs)]
            seed = (minute * 31 + k * 17) % 997
            inp = 50 + seed
            out = 100 + (seed * 3) % 1500
            req = 1 + seed % 5
            buf.write(f"{endpoint}\t{model}\t{inp}\t{out}\t{inp + out}\t{req}\t{stamp}\n")
            t = totals.setdefault((endpoint, model), [0, 0, 0])
            t[0] += inp
            t[1] += out
            t[2] += req
            written += 1
    buf.seek(0)
    return buf, totals, first


def cmd_fill_series(rows: int) -> dict[str, Any]:
    if connection.vendor != "postgresql":
        raise SystemExit("fill-series needs PostgreSQL (COPY)")
    started = time.perf_counter()
    end = datetime.now(tz=UTC).replace(second=0, microsecond=0)
    buf, totals, first = _rows(rows, end)
    generated = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE stats_tokentimeseries, stats_tokentotal, stats_tokendaily")
        raw = cursor.cursor
        columns = "endpoint, model, input_tokens, output_tokens, total_tokens, requests, timestamp"
        with raw.copy(f"COPY stats_tokentimeseries ({columns}) FROM STDIN") as copy:
            while block := buf.read(1 << 20):
                copy.write(block)
        with raw.copy(
            "COPY stats_tokentotal (endpoint, model, input_tokens, output_tokens, total_tokens, requests, "
            "incomplete) FROM STDIN"
        ) as copy:
            for (endpoint, model), (inp, out, req) in totals.items():
                copy.write_row((endpoint, model, inp, out, inp + out, req, 0))
    copied = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE stats_tokentimeseries")
        cursor.execute("ANALYZE stats_tokentotal")
        cursor.execute("SELECT count(*), min(timestamp), max(timestamp) FROM stats_tokentimeseries")
        count, lo, hi = cursor.fetchone()
        cursor.execute("SELECT pg_size_pretty(pg_total_relation_size('stats_tokentimeseries'))")
        (size,) = cursor.fetchone()
    return {
        "rows": count,
        "first": lo.isoformat(),
        "last": hi.isoformat(),
        "models": MODELS,
        "endpoints": ENDPOINTS,
        "generate_s": round(generated - started, 2),
        "copy_s": round(copied - generated, 2),
        "analyze_s": round(time.perf_counter() - copied, 2),
        "table_size": size,
        "first_minute": first.isoformat(),
    }


def cmd_stats_explain(model: str, start_raw: str, end_raw: str, repeat: int) -> dict[str, Any]:
    from stats import queries

    start, end = queries.resolve_range(start_raw, end_raw)
    bucket = queries.choose_bucket(None, start, end)
    queries.model_stats(model, start, end, bucket)  # warm the cache and the connection
    timings = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = queries.model_stats(model, start, end, bucket)
        timings.append((time.perf_counter() - t0) * 1000)
    with CaptureQueriesContext(connection) as captured:
        result = queries.model_stats(model, start, end, bucket)
    statements = [q["sql"] for q in captured.captured_queries]
    series = [s for s in statements if "stats_tokentimeseries" in s]
    main = series[0] if series else statements[-1]
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + main)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("SELECT version()")
        (version,) = cursor.fetchone()
    timings.sort()
    return {
        "model": model,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "bucket": bucket,
        "points": len(result.points),
        "statements": statements,
        "main_sql": main,
        "explain": plan,
        "in_process_ms_p50": timings[len(timings) // 2],
        "in_process_ms_min": timings[0],
        "postgres_version": version,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dbtool")
    sub = parser.add_subparsers(dest="command", required=True)
    ep = sub.add_parser("endpoints")
    ep.add_argument("spec")
    fill = sub.add_parser("fill-series")
    fill.add_argument("--rows", type=int, default=1_000_000)
    explain = sub.add_parser("stats-explain")
    explain.add_argument("--model", required=True)
    explain.add_argument("--from", dest="start", required=True)
    explain.add_argument("--to", dest="end", required=True)
    explain.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "endpoints":
        out = cmd_endpoints(args.spec)
    elif args.command == "fill-series":
        out = cmd_fill_series(args.rows)
    else:
        out = cmd_stats_explain(args.model, args.start, args.end, args.repeat)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
