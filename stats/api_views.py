"""NOMYO Router-compatible statistics routes, on the lean async proxy path.

Response shapes follow NOMYO Router (its users' scripts keep working); extra keys are
only ever added. These views run without Django's request signals, so every database
access goes through `_in_thread`, which runs a plain function from stats/queries.py or
stats/rollup.py in a worker thread and closes stale connections before and after.

Endpoints are keyed by url, as NOMYO Router does. Api keys never appear in any answer.
"""

from __future__ import annotations

import asyncio
import csv
import heapq
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar, cast

from asgiref.sync import sync_to_async
from django.db import DatabaseError, close_old_connections
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse

from routing.auth.principal import principal_of
from routing.core.errors import ApiError
from routing.core.names import is_model_name
from routing.fleet import caches, health, probes
from routing.fleet.breaker import State, breakers
from routing.fleet.registry import EndpointInfo, registry
from routing.protocols.common.decorators import (
    SHOWS_EVERYONE,
    methods,
    operator_reads,
    refuse_unless_operator,
)
from routing.protocols.common.parsing import parse_object
from routing.status.types import BreakerState
from stats import queries, rollup, snapshot
from stats.publisher import publisher
from stats.types import ConfigEndpoint, NomyoUsage, UsageEvent, UsagePart, UsageSnapshot

log = logging.getLogger("stats.api")

P = ParamSpec("P")
T = TypeVar("T")


async def _in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ORM code off the event loop (not thread-sensitive), with clean connections."""

    def run() -> T:
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return await sync_to_async(run, thread_sensitive=False)()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def _body(request: HttpRequest) -> dict[str, Any]:
    """The JSON object body ({} when there is none), or a 400. parse_object answers 400 for
    what it recognises; any other ValueError of the JSON decoder (an integer longer than
    Python's 4,300-digit conversion limit) is the client's too."""
    if not request.body.strip():
        return {}
    try:
        return parse_object(request.body)
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON: {str(exc)[:200]}") from None


def _params(request: HttpRequest) -> dict[str, Any]:
    """Query-string parameters, overridden by a JSON object body when there is one."""
    params: dict[str, Any] = {key: request.GET.get(key) for key in request.GET}
    params.update(_body(request))
    return params


# -- /api/usage ----------------------------------------------------------------------
def _nomyo_usage(snap: UsageSnapshot) -> NomyoUsage:
    """NOMYO Router's two maps, from a usage snapshot: active requests and total tokens,
    {endpoint url: {model: n}}. Every configured endpoint appears, idle ones as {}."""
    urls: dict[int, str] = {ep["id"]: ep["url"] for ep in snap.get("endpoints", [])}
    usage: dict[str, dict[str, int]] = {url: {} for url in urls.values()}
    for row in snap.get("active", []):
        if row["count"] <= 0:
            continue
        url = urls.get(row["endpoint_id"], str(row["endpoint"]))
        models = usage.setdefault(url, {})
        models[row["model"]] = models.get(row["model"], 0) + row["count"]
    tokens: dict[str, dict[str, int]] = {}
    for token_row in snap.get("tokens", []):
        models = tokens.setdefault(token_row["endpoint"], {})
        models[token_row["model"]] = models.get(token_row["model"], 0) + token_row["total"]
    return {"usage_counts": usage, "token_usage_counts": tokens}


async def _load_registry() -> None:
    """Snapshots read the registry's in-memory copy: make sure it is loaded. A database
    outage leaves the last copy in place (these routes need no database)."""
    try:
        await registry.all()
    except DatabaseError:
        log.warning("could not reload the endpoint registry; using the cached copy", exc_info=True)


@methods("GET")
@operator_reads
async def usage(request: HttpRequest) -> HttpResponseBase:
    """{"usage_counts": {url: {model: active}}, "token_usage_counts": {url: {model: total tokens}}}"""
    await _load_registry()
    return JsonResponse(_nomyo_usage(snapshot.build()))


# -- /api/token_counts ---------------------------------------------------------------
def _totals_now() -> dict[queries.Pair, queries.Counts]:
    try:
        return queries.pair_totals()
    except DatabaseError:
        log.warning("token totals: database unavailable, answering from memory", exc_info=True)
        return queries.recorder_pair_totals()


@methods("GET")
@operator_reads
async def token_counts(request: HttpRequest) -> HttpResponseBase:
    """{"total_tokens": n, "breakdown": [{endpoint, model, input_tokens, output_tokens,
    total_tokens, requests}]}: all-time totals, the database plus this process's unflushed counts."""
    totals = await _in_thread(_totals_now)
    breakdown = [
        {"endpoint": endpoint, "model": model, **c.as_dict()} for (endpoint, model), c in totals.items()
    ]
    return JsonResponse(
        {"total_tokens": sum(c.total_tokens for c in totals.values()), "breakdown": breakdown}
    )


# -- /api/stats ----------------------------------------------------------------------
def _model_param(params: dict[str, Any]) -> str:
    model = params.get("model")
    if model is None or model == "":
        raise ApiError(400, "Missing required field 'model'")
    if not isinstance(model, str) or not is_model_name(model):  # the routes' own check
        raise ApiError(400, "'model' must be a model name")
    return model


def _client_param(params: dict[str, Any]) -> str | None:
    """The optional `client` filter: a client key's name, or anonymous / operator."""
    client = params.get("client")
    if client is None or client == "":
        return None
    if (
        not isinstance(client, str)
        or len(client) > 100
        or any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in client)
    ):
        raise ApiError(400, "'client' must be a client key's name, 'anonymous' or 'operator'")
    return client


def _client_for(request: HttpRequest, client: str | None) -> str | None:
    """The client whose usage the caller may read: a client key reads its own (the default for
    it), and another's is a 403 (`operator_only`); the operator and an open router read any."""
    principal = principal_of(request)
    if principal.may_manage:
        return client
    if client is not None and client != principal.name:
        refuse_unless_operator(principal, f"{request.path} for the client '{client}'", SHOWS_EVERYONE)
    return principal.name


def _range_params(params: dict[str, Any]) -> tuple[datetime, datetime]:
    try:
        return queries.resolve_range(params.get("from"), params.get("to"))
    except queries.QueryError as exc:
        raise ApiError(400, str(exc)) from None


@methods("POST")
async def stats(request: HttpRequest) -> HttpResponseBase:
    """Token statistics of one model.

    Body (or query string): {"model": str, "from"?: ISO 8601 | unix s, "to"?: ..., "bucket"?:
    "minute" | "hour" | "day", "client"?: a client key's name, "anonymous" or "operator" (only
    that client's tokens)}. The model in any spelling the model lists show (`m` and
    `m:latest` are one model). Times lie between 1970-01-01 and 9999-01-01 (else a 400).
    Range defaults to the last 30 days; bucket to one sized to the range. Answer, as NOMYO
    Router's: model, all-time input/output/total tokens, time_series
    [{endpoint, timestamp (unix s, bucket start), input_tokens, output_tokens, total_tokens}]
    oldest first, endpoint_distribution {url: total tokens in the range}; added: requests,
    from, to, bucket and range_totals. A model never counted is a 404, as in NOMYO Router.
    """
    params = _params(request)
    model = _model_param(params)
    client = _client_for(request, _client_param(params))
    start, end = _range_params(params)
    try:
        bucket = queries.choose_bucket(params.get("bucket"), start, end)
    except queries.QueryError as exc:
        raise ApiError(400, str(exc)) from None
    result = await _in_thread(queries.model_stats, model, start, end, bucket, client)
    if result.totals is None and not result.points:
        raise ApiError(404, "No token data found for this model")
    totals = result.totals or result.range_totals
    extra = {"client": client} if client is not None else {}
    return JsonResponse(
        {
            "model": model,
            **extra,
            **totals.as_dict(),
            "time_series": [
                {"endpoint": p.endpoint, "timestamp": _unix(p.timestamp), **p.counts.as_dict()}
                for p in result.points
            ],
            "endpoint_distribution": result.endpoint_distribution(),
            "from": _iso(start),
            "to": _iso(end),
            "bucket": bucket,
            "range_totals": result.range_totals.as_dict(),
        }
    )


# -- /api/stats.csv ------------------------------------------------------------------
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: object) -> object:
    """A CSV cell a spreadsheet will not run: a str starting with = + - @, a tab or a carriage
    return gets a leading single quote (OWASP, CSV injection); numbers and other text as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _csv_bytes(rows: list[queries.CsvRow]) -> bytes:
    """Rows as CSV (CRLF): the timestamp in ISO 8601, text cells through `csv_text`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerows((_iso(r[0]), *map(csv_text, r[1:])) for r in rows)
    return buf.getvalue().encode("utf-8")


def _first_csv_part(
    start: datetime, end: datetime, model: str | None, client: str | None
) -> tuple[list[queries.CsvRow], list[queries.CsvRow], datetime | None]:
    daily = queries.csv_daily_rows(start, end, model, client)
    rows, after = queries.csv_page(start, end, model, None, client=client)
    return daily, rows, after


async def _csv_stream(
    start: datetime,
    end: datetime,
    model: str | None,
    client: str | None,
    daily: list[queries.CsvRow],
    rows: list[queries.CsvRow],
    after: datetime | None,
) -> AsyncIterator[bytes]:
    yield (",".join(queries.CSV_FIELDS) + "\r\n").encode()
    pending = daily  # rolled-up days, merged in timestamp order
    while True:
        if rows:
            last = rows[-1][0]
            due = 0
            while due < len(pending) and pending[due][0] <= last:
                due += 1
            page = list(heapq.merge(pending[:due], rows, key=lambda r: (r[0], r[1], r[2], r[7], r[8])))
            pending = pending[due:]
            yield _csv_bytes(page)
        if after is None:
            break
        rows, after = await _in_thread(queries.csv_page, start, end, model, after, None, client)
    if pending:
        yield _csv_bytes(pending)


@methods("GET")
async def stats_csv(request: HttpRequest) -> HttpResponseBase:
    """GET ?from=&to=&model=&client= : every minute row (and rolled-up day) in the range as CSV,
    streamed, one row per (minute, endpoint, model, client). Parameters as for /api/stats; the rows
    keep the model name they were stored under."""
    unknown = set(request.GET) - {"from", "to", "model", "client"}
    if unknown:
        raise ApiError(
            400, f"unknown parameter(s): {', '.join(sorted(unknown))}; use from, to, model, client"
        )
    start, end = _range_params({k: request.GET.get(k) for k in ("from", "to")})
    model = request.GET.get("model") or None
    if model is not None:
        model = _model_param({"model": model})
    client = _client_for(request, _client_param({"client": request.GET.get("client")}))
    # The first page is read before answering, so a database error is a clean 500, not a cut stream.
    daily, rows, after = await _in_thread(_first_csv_part, start, end, model, client)
    response = StreamingHttpResponse(
        _csv_stream(start, end, model, client, daily, rows, after), content_type="text/csv; charset=utf-8"
    )
    name = f"token-stats-{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "no-store"
    return response


# -- /api/aggregate_time_series_days ---------------------------------------------------
def _days_param(value: object) -> int:
    """1 to rollup.MAX_DAYS, as a JSON integer or a string of ASCII digits; else a 400."""
    if value is None:
        return rollup.DEFAULT_DAYS
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 6:
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= rollup.MAX_DAYS:
        raise ApiError(400, f"'days' must be a whole number from 1 to {rollup.MAX_DAYS}")
    return value


@methods("POST")
@operator_reads
async def aggregate(request: HttpRequest) -> HttpResponseBase:
    """Body {"days"?: 30, "trim_old"?: false}; the same as `manage.py aggregate_time_series`.

    Answer, as NOMYO Router's: {"status": "ok", "days", "trim_old", "aggregated_groups"};
    added: folded_rows and cutoff. Folded rows are always moved (see stats/rollup.py), so
    trim_old changes nothing and a second call folds nothing twice.
    """
    data = _body(request)
    days = _days_param(data.get("days"))
    trim_old = data.get("trim_old", False)
    if trim_old is None:
        trim_old = False
    if not isinstance(trim_old, bool):
        raise ApiError(400, "'trim_old' must be a boolean")
    result = await _in_thread(rollup.roll_up, days)
    return JsonResponse(
        {
            "status": "ok",
            "days": days,
            "trim_old": trim_old,
            "aggregated_groups": result.groups,
            "folded_rows": result.rows,
            "cutoff": _iso(result.cutoff),
        }
    )


# -- /api/config ---------------------------------------------------------------------
async def _version_of(ep: EndpointInfo) -> str | None:
    """The cached version; an enabled endpoint of unknown state is probed once (coalesced)."""
    cached = caches.versions.peek(ep.id)
    if cached is not None or not ep.enabled or breakers.is_open(ep.id):
        return cached
    try:
        version = await caches.versions.get(ep.id, lambda: probes.fetch_version(ep))
    except probes.ProbeError as exc:
        health.mark_failing(ep, str(exc))
        return None
    health.mark_healthy(ep)
    return version


def _endpoint_state(ep: EndpointInfo, version: str | None) -> ConfigEndpoint:
    view = breakers.view(ep.id)
    healthy = ep.enabled and view.state is not State.OPEN and version is not None
    state: ConfigEndpoint = {
        # NOMYO Router's keys first; never the api key.
        "url": ep.url,
        "status": "disabled" if not ep.enabled else ("ok" if healthy else "error"),
        "version": version,
        "id": ep.id,
        "name": ep.name,
        "kind": ep.kind,
        "enabled": ep.enabled,
        "limit": ep.limit,
        "tier": ep.tier,
        "weight": ep.weight,
        "healthy": healthy,
        "failing_since": view.since,
        "breaker": cast(BreakerState, view.state.value),
    }
    if view.since is not None:
        state["detail"] = view.reason
    elif ep.enabled and not healthy:
        state["detail"] = "state unknown"
    return state


@methods("GET")
@operator_reads
async def config(request: HttpRequest) -> HttpResponseBase:
    """{"endpoints": [{url, status ("ok" | "error" | "disabled"), version, detail?, id, name,
    kind, enabled, limit, tier, weight, healthy, failing_since}]}"""
    endpoints = await registry.all()
    versions = await asyncio.gather(*(_version_of(ep) for ep in endpoints))
    return JsonResponse(
        {"endpoints": [_endpoint_state(ep, v) for ep, v in zip(endpoints, versions, strict=True)]}
    )


# -- /api/usage-stream ---------------------------------------------------------------
def _sse_event(snap: UsageSnapshot | UsagePart) -> bytes:
    """One snapshot as an SSE message, with NOMYO Router's usage_counts/token_usage_counts added."""
    payload: UsageEvent = {**snap, **_nomyo_usage(snap)}
    return b"data: " + json.dumps(payload, separators=(",", ":"), default=str).encode() + b"\n\n"


async def _usage_events() -> AsyncIterator[bytes]:
    sub = publisher.subscribe()
    try:
        yield _sse_event(snapshot.build())
        while True:
            yield _sse_event(await sub.get())
    finally:
        publisher.unsubscribe(sub)


@methods("GET")
@operator_reads
async def usage_stream(request: HttpRequest) -> HttpResponseBase:
    """Server-Sent Events: the current usage snapshot now, then one per change (at least every 2 s)."""
    await _load_registry()
    response = StreamingHttpResponse(_usage_events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # proxies must not hold events back
    return response
