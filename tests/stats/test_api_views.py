"""The NOMYO Router-compatible statistics routes, called directly as async views (and once
end to end through a real router process)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.test import AsyncRequestFactory

from routing.auth.principal import ANONYMOUS
from routing.core.errors import ApiError, error_response
from routing.engine.accounting import Counts as StreamCounts
from routing.engine.board import board
from routing.fleet import caches
from routing.fleet.breaker import breakers
from routing.fleet.candidates import Candidate
from routing.fleet.registry import registry
from routing.models import Endpoint
from stats import api_views
from stats.models import TokenDaily, TokenTimeSeries, TokenTotal
from stats.publisher import publisher
from stats.recorder import recorder

rf = AsyncRequestFactory()
T0 = datetime(2025, 3, 10, tzinfo=UTC)
EP1 = "http://a:11434"
EP2 = "http://b:11434"

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def clean_state() -> Iterator[None]:
    def reset() -> None:
        recorder.clear()
        registry.clear()
        caches.clear_all()
        board.clear()

    reset()
    yield
    reset()


async def call(view: Callable[[HttpRequest], Awaitable[HttpResponseBase]], request: HttpRequest) -> Any:
    """The view's answer as the lean handler sends it (ApiError -> {"error": ...}), on an open
    router (the caller is anonymous) unless the request already names its principal."""
    if not hasattr(request, "principal"):
        request.principal = ANONYMOUS  # type: ignore[attr-defined]
    try:
        return await view(request)
    except ApiError as err:
        return error_response(request.path, err)


def body(response: HttpResponseBase) -> Any:
    assert isinstance(response, JsonResponse)
    return json.loads(response.content)


async def content(response: HttpResponseBase) -> bytes:
    assert isinstance(response, StreamingHttpResponse)
    return b"".join([chunk async for chunk in response])  # type: ignore[attr-defined]


def post(path: str, data: Any = None, raw: bytes | None = None) -> HttpRequest:
    payload = raw if raw is not None else (b"" if data is None else json.dumps(data).encode())
    return rf.post(path, data=payload, content_type="application/json")


@sync_to_async
def add_rows() -> None:
    TokenTotal.objects.create(
        endpoint=EP1, model="llama3", input_tokens=40, output_tokens=60, total_tokens=100, requests=4
    )
    TokenTotal.objects.create(
        endpoint=EP2, model="llama3", input_tokens=5, output_tokens=5, total_tokens=10, requests=1
    )
    TokenTotal.objects.create(endpoint=EP1, model="qwen", input_tokens=1, output_tokens=1, total_tokens=2)
    for ep, minutes, inp, out in ((EP1, 1, 10, 20), (EP1, 61, 30, 40), (EP2, 2, 5, 5)):
        TokenTimeSeries.objects.create(
            endpoint=ep,
            model="llama3",
            timestamp=T0 + timedelta(minutes=minutes),
            input_tokens=inp,
            output_tokens=out,
            total_tokens=inp + out,
            requests=2,
        )
    TokenTimeSeries.objects.create(endpoint=EP1, model="qwen", timestamp=T0, total_tokens=2, requests=1)
    TokenDaily.objects.create(
        endpoint=EP1, model="llama3", day=date(2025, 3, 9), input_tokens=0, output_tokens=0, total_tokens=0
    )


# -- /api/stats ----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_stats_shape_and_sums() -> None:
    await add_rows()
    request = post("/api/stats", {"model": "llama3", "from": "2025-03-10T00:00:00Z", "to": 1741575600})
    response = await call(api_views.stats, request)
    assert response.status_code == 200
    data = body(response)
    assert data["model"] == "llama3"
    # All-time totals, as NOMYO Router answers them.
    assert (data["input_tokens"], data["output_tokens"], data["total_tokens"]) == (45, 65, 110)
    assert data["requests"] == 5
    assert data["bucket"] == "minute"  # a 3-hour range
    assert data["from"] == "2025-03-10T00:00:00Z" and data["to"] == "2025-03-10T03:00:00Z"
    assert data["time_series"] == [
        {
            "endpoint": EP1,
            "timestamp": int((T0 + timedelta(minutes=1)).timestamp()),
            "input_tokens": 10,
            "output_tokens": 20,
            "total_tokens": 30,
            "requests": 2,
        },
        {
            "endpoint": EP2,
            "timestamp": int((T0 + timedelta(minutes=2)).timestamp()),
            "input_tokens": 5,
            "output_tokens": 5,
            "total_tokens": 10,
            "requests": 2,
        },
        {
            "endpoint": EP1,
            "timestamp": int((T0 + timedelta(minutes=61)).timestamp()),
            "input_tokens": 30,
            "output_tokens": 40,
            "total_tokens": 70,
            "requests": 2,
        },
    ]
    assert data["endpoint_distribution"] == {EP1: 100, EP2: 10}
    assert data["range_totals"] == {
        "input_tokens": 45,
        "output_tokens": 65,
        "total_tokens": 110,
        "requests": 6,
    }

    hourly = body(
        await call(
            api_views.stats, post("/api/stats", {"model": "llama3", "from": T0.isoformat(), "bucket": "hour"})
        )
    )
    assert [(p["timestamp"], p["endpoint"], p["total_tokens"]) for p in hourly["time_series"]] == [
        (int(T0.timestamp()), EP1, 30),
        (int(T0.timestamp()), EP2, 10),
        (int((T0 + timedelta(hours=1)).timestamp()), EP1, 70),
    ]
    # From the day before: the rolled-up day (empty here) appears at its midnight.
    daily_req = post("/api/stats", {"model": "llama3", "from": "2025-03-09", "to": "2025-03-11"})
    daily = body(await call(api_views.stats, daily_req))
    assert daily["bucket"] == "hour"
    assert daily["time_series"][0]["timestamp"] == int(datetime(2025, 3, 9, tzinfo=UTC).timestamp())
    assert daily["range_totals"]["total_tokens"] == 110


@pytest.mark.asyncio
async def test_stats_default_range_is_the_last_30_days_and_includes_unflushed_totals() -> None:
    recorder.record(ANONYMOUS, EP1, "fresh", StreamCounts(prompt=3, completion=4))
    data = body(await call(api_views.stats, post("/api/stats", {"model": "fresh"})))
    assert data["total_tokens"] == 7 and data["requests"] == 1
    assert data["time_series"] == []  # not flushed yet
    assert data["bucket"] == "hour"
    start = datetime.fromisoformat(data["from"])
    end = datetime.fromisoformat(data["to"])
    assert end - start == timedelta(days=30)
    assert abs((end - datetime.now(tz=UTC)).total_seconds()) <= 61


@pytest.mark.asyncio
async def test_stats_model_in_query_string() -> None:
    await add_rows()
    request = rf.post("/api/stats?model=qwen&from=2025-03-09&to=2025-03-11", data=b"", content_type="")
    data = body(await call(api_views.stats, request))
    assert data["model"] == "qwen" and data["total_tokens"] == 2
    assert data["endpoint_distribution"] == {EP1: 2}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({}, 400, "Missing required field 'model'"),
        ({"model": ""}, 400, "Missing required field 'model'"),
        ({"model": 3}, 400, "'model' must be a model name"),
        ({"model": "llama3", "from": "soon"}, 400, "'from' is not an ISO 8601"),
        ({"model": "llama3", "from": "2025-03-11", "to": "2025-03-10"}, 400, "earlier"),
        ({"model": "llama3", "bucket": "week"}, 400, "'bucket' must be one of"),
        ({"model": "llama3", "from": 0, "bucket": "minute"}, 400, "range too long"),
        ({"model": "never-used"}, 404, "No token data found for this model"),
    ],
)
async def test_stats_errors(payload: dict[str, Any], status: int, message: str) -> None:
    await add_rows()
    response = await call(api_views.stats, post("/api/stats", payload))
    assert response.status_code == status
    assert message in body(response)["error"]


@pytest.mark.asyncio
async def test_stats_bad_json_and_method() -> None:
    response = await call(api_views.stats, post("/api/stats", raw=b"{nope"))
    assert response.status_code == 400 and "invalid JSON" in body(response)["error"]
    response = await call(api_views.stats, rf.get("/api/stats"))
    assert response.status_code == 405


# -- /api/token_counts ---------------------------------------------------------------
@pytest.mark.asyncio
async def test_token_counts_shape_with_pending() -> None:
    await add_rows()
    recorder.record(ANONYMOUS, EP2, "qwen", StreamCounts(prompt=10, completion=20))
    data = body(await call(api_views.token_counts, rf.get("/api/token_counts")))
    assert data["total_tokens"] == 100 + 10 + 2 + 30
    assert data["breakdown"] == [
        {
            "endpoint": EP1,
            "model": "llama3",
            "input_tokens": 40,
            "output_tokens": 60,
            "total_tokens": 100,
            "requests": 4,
        },
        {
            "endpoint": EP1,
            "model": "qwen",
            "input_tokens": 1,
            "output_tokens": 1,
            "total_tokens": 2,
            "requests": 0,
        },
        {
            "endpoint": EP2,
            "model": "llama3",
            "input_tokens": 5,
            "output_tokens": 5,
            "total_tokens": 10,
            "requests": 1,
        },
        {
            "endpoint": EP2,
            "model": "qwen",
            "input_tokens": 10,
            "output_tokens": 20,
            "total_tokens": 30,
            "requests": 1,
        },
    ]


# -- /api/usage ----------------------------------------------------------------------
@sync_to_async
def add_endpoints() -> tuple[Endpoint, Endpoint, Endpoint]:
    a = Endpoint.objects.create(
        url=EP1, name="alpha", api_key="sk-very-secret-1", max_concurrent_connections=4
    )
    b = Endpoint.objects.create(
        url="http://b:8080/v1", name="beta", kind="openai", api_key="sk-very-secret-2"
    )
    c = Endpoint.objects.create(url="http://c:11434", name="gamma", enabled=False, api_key="sk-very-secret-3")
    return a, b, c


@pytest.mark.asyncio
async def test_usage_shape() -> None:
    a, _b, _c = await add_endpoints()
    infos = {ep.id: ep for ep in await registry.all()}
    lease1 = board.try_acquire("llama3:latest", [Candidate(infos[a.id], "llama3:latest", True)])
    lease2 = board.try_acquire("llama3:latest", [Candidate(infos[a.id], "llama3:latest", True)])
    assert lease1 is not None and lease2 is not None
    recorder.record(ANONYMOUS, EP1, "llama3:latest", StreamCounts(prompt=5, completion=6))
    try:
        data = body(await call(api_views.usage, rf.get("/api/usage")))
    finally:
        lease1.release()
        lease2.release()
    assert data == {
        "usage_counts": {EP1: {"llama3:latest": 2}, "http://b:8080/v1": {}, "http://c:11434": {}},
        "token_usage_counts": {EP1: {"llama3:latest": 11}},
    }
    idle = body(await call(api_views.usage, rf.get("/api/usage")))
    assert idle["usage_counts"][EP1] == {}


# -- /api/config ---------------------------------------------------------------------
@pytest.mark.asyncio
async def test_config_states_and_no_api_keys() -> None:
    a, b, _c = await add_endpoints()
    caches.versions.put(a.id, "0.12.0")
    caches.advertised.invalidate()
    breakers.failed(b.id, "connection refused", strong=True)
    response = await call(api_views.config, rf.get("/api/config"))
    assert b"sk-very-secret" not in response.content and b"api_key" not in response.content
    endpoints = {e["name"]: e for e in body(response)["endpoints"]}
    assert endpoints["alpha"] == {
        "url": EP1,
        "status": "ok",
        "version": "0.12.0",
        "id": a.id,
        "name": "alpha",
        "kind": "ollama",
        "enabled": True,
        "limit": 4,
        "tier": 0,
        "weight": 1,
        "healthy": True,
        "failing_since": None,
        "breaker": "closed",
    }
    assert endpoints["beta"]["status"] == "error" and endpoints["beta"]["detail"] == "connection refused"
    assert endpoints["beta"]["breaker"] == "open"
    assert endpoints["beta"]["healthy"] is False and endpoints["beta"]["failing_since"] is not None
    assert endpoints["gamma"]["status"] == "disabled" and endpoints["gamma"]["enabled"] is False
    assert [e["url"] for e in body(response)["endpoints"]] == [EP1, "http://b:8080/v1", "http://c:11434"]


# -- /api/stats.csv ------------------------------------------------------------------
@pytest.mark.asyncio
async def test_csv_export() -> None:
    await add_rows()
    await sync_to_async(TokenDaily.objects.create)(
        endpoint=EP2, model="llama3", day=date(2025, 3, 10), input_tokens=7, output_tokens=0, total_tokens=7
    )
    response = await call(api_views.stats_csv, rf.get("/api/stats.csv?from=2025-03-10&to=2025-03-11"))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO((await content(response)).decode())))
    assert rows == [
        [
            "timestamp",
            "endpoint",
            "model",
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "requests",
            "client",
            "requested_model",
        ],
        ["2025-03-10T00:00:00Z", EP1, "qwen", "0", "0", "2", "1", "anonymous", ""],
        # a rolled-up day, at its midnight
        ["2025-03-10T00:00:00Z", EP2, "llama3", "7", "0", "7", "0", "anonymous", ""],
        ["2025-03-10T00:01:00Z", EP1, "llama3", "10", "20", "30", "2", "anonymous", ""],
        ["2025-03-10T00:02:00Z", EP2, "llama3", "5", "5", "10", "2", "anonymous", ""],
        ["2025-03-10T01:01:00Z", EP1, "llama3", "30", "40", "70", "2", "anonymous", ""],
    ]
    only = await content(await call(api_views.stats_csv, rf.get("/api/stats.csv?from=2025-03-10&model=qwen")))
    assert only.decode().splitlines()[1:] == [f"2025-03-10T00:00:00Z,{EP1},qwen,0,0,2,1,anonymous,"]


@pytest.mark.asyncio
async def test_csv_text_cells_are_never_formulas() -> None:
    """OWASP CSV injection: a text cell starting with = + - @, a tab or a CR gets a leading '; the
    numbers and ordinary text are as stored."""

    @sync_to_async
    def rows() -> None:
        for client, model, tokens in (
            ("=1+1,x", "@SUM(A1)", 3),
            ("+x", "-m", 4),
            ("\tt", "\rr", 5),
            ("team-a", "llama3", 6),
        ):
            TokenTimeSeries.objects.create(
                endpoint=EP1, model=model, client=client, timestamp=T0, total_tokens=tokens, requests=1
            )
        TokenTimeSeries.objects.create(
            endpoint="=HYPERLINK(1)", model="m", requested_model="+m", timestamp=T0, total_tokens=7
        )

    await rows()
    response = await call(api_views.stats_csv, rf.get("/api/stats.csv?from=2025-03-10&to=2025-03-11"))
    lines = csv.reader(io.StringIO((await content(response)).decode()))
    got = {(r[1], r[2], r[7], r[8]): r[5] for r in lines}
    assert got == {
        ("endpoint", "model", "client", "requested_model"): "total_tokens",
        (EP1, "'@SUM(A1)", "'=1+1,x", ""): "3",
        (EP1, "'-m", "'+x", ""): "4",
        (EP1, "'\rr", "'\tt", ""): "5",
        (EP1, "llama3", "team-a", ""): "6",
        ("'=HYPERLINK(1)", "m", "anonymous", "'+m"): "7",
    }


@pytest.mark.asyncio
async def test_csv_export_pages_through_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from stats import queries

    monkeypatch.setattr(queries, "CSV_PAGE", 7)

    @sync_to_async
    def many() -> None:
        TokenTimeSeries.objects.bulk_create(
            TokenTimeSeries(endpoint=ep, model="m", timestamp=T0 + timedelta(minutes=i), total_tokens=i)
            for i in range(50)
            for ep in (EP1, EP2, "http://c:1")
        )
        for d in (9, 10, 11):
            TokenDaily.objects.create(endpoint=EP1, model="m", day=date(2025, 3, d), total_tokens=1000)

    await many()
    response = await call(
        api_views.stats_csv, rf.get("/api/stats.csv?from=2025-03-09&to=2025-03-11T00:00:01Z")
    )
    lines = (await content(response)).decode().splitlines()[1:]
    assert len(lines) == 150 + 3
    stamps = [line.split(",")[0] for line in lines]
    assert stamps == sorted(stamps)
    assert sum(int(line.split(",")[5]) for line in lines) == 3 * sum(range(50)) + 3000


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "query",
    ["from=yesterday", "from=2025-03-11&to=2025-03-10", "to=", "bucket=hour", "model=%01"],
)
async def test_csv_bad_params(query: str) -> None:
    response = await call(api_views.stats_csv, rf.get(f"/api/stats.csv?{query}"))
    if query == "to=":  # an empty value means the default
        assert response.status_code == 200
        return
    assert response.status_code == 400, query
    assert body(response)["error"]


# -- /api/aggregate_time_series_days -------------------------------------------------
@pytest.mark.asyncio
async def test_aggregate_route() -> None:
    old = (datetime.now(tz=UTC) - timedelta(days=40)).replace(second=0, microsecond=0)

    @sync_to_async
    def rows() -> None:
        for ep in (EP1, EP2):
            TokenTimeSeries.objects.create(endpoint=ep, model="m", timestamp=old, total_tokens=5, requests=1)
        TokenTimeSeries.objects.create(
            endpoint=EP1,
            model="m",
            timestamp=datetime.now(tz=UTC).replace(second=0, microsecond=0),
            total_tokens=1,
        )

    await rows()
    data = body(
        await call(
            api_views.aggregate, post("/api/aggregate_time_series_days", {"days": 30, "trim_old": True})
        )
    )
    assert data["status"] == "ok" and data["days"] == 30 and data["trim_old"] is True
    assert data["aggregated_groups"] == 2 and data["folded_rows"] == 2
    assert data["cutoff"].endswith("T00:00:00Z")
    again = body(await call(api_views.aggregate, post("/api/aggregate_time_series_days")))  # NOMYO defaults
    assert (again["days"], again["trim_old"], again["aggregated_groups"], again["folded_rows"]) == (
        30,
        False,
        0,
        0,
    )
    assert await sync_to_async(TokenDaily.objects.count)() == 2
    assert await sync_to_async(TokenTimeSeries.objects.count)() == 1
    for bad in ({"days": 0}, {"days": "x"}, {"days": True}, {"trim_old": "yes"}):
        response = await call(api_views.aggregate, post("/api/aggregate_time_series_days", bad))
        assert response.status_code == 400, bad
    response = await call(api_views.aggregate, rf.get("/api/aggregate_time_series_days"))
    assert response.status_code == 405


# -- /api/usage-stream ---------------------------------------------------------------
@pytest.mark.asyncio
async def test_usage_stream_sends_snapshots_and_unsubscribes() -> None:
    await add_endpoints()
    recorder.record(ANONYMOUS, EP1, "llama3", StreamCounts(prompt=1, completion=1))
    subscribers = publisher.subscriber_count()
    response = await call(api_views.usage_stream, rf.get("/api/usage-stream"))
    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    received: list[bytes] = []
    arrived = asyncio.Event()

    async def consume() -> None:  # as the lean handler does; it cancels the task on disconnect
        async for chunk in response:  # type: ignore[attr-defined]
            received.append(chunk)
            arrived.set()

    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(arrived.wait(), 5)
        first = received[0]
        assert first.startswith(b"data: ") and first.endswith(b"\n\n")
        snap = json.loads(first[len(b"data: ") :])
        assert snap["type"] == "usage.snapshot"
        assert snap["token_usage_counts"] == {EP1: {"llama3": 2}}
        assert set(snap["usage_counts"]) == {EP1, "http://b:8080/v1", "http://c:11434"}
        assert b"sk-very-secret" not in first
        assert publisher.subscriber_count() == subscribers + 1

        arrived.clear()
        published = await publisher.publish_now()
        await asyncio.wait_for(arrived.wait(), 5)
        assert json.loads(received[1][len(b"data: ") :])["taken_at"] == published["taken_at"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert publisher.subscriber_count() == subscribers


# -- end to end, through the lean ASGI path of a real router process -------------------
def test_routes_through_a_running_router(router: Callable[..., Any], fakes: Callable[..., Any]) -> None:
    fake = fakes(version="0.9.1")
    Endpoint.objects.create(url=f"http://127.0.0.1:{fake.port}", name="fake", api_key="sk-very-secret-e2e")
    TokenTotal.objects.create(endpoint="http://x", model="m", input_tokens=1, output_tokens=2, total_tokens=3)
    proc = router()
    with httpx.Client(base_url=proc.url, timeout=10) as client:
        r = client.post("/api/stats", json={})
        assert (r.status_code, r.json()) == (400, {"error": "Missing required field 'model'"})
        r = client.post("/api/stats", json={"model": "m"})
        assert r.status_code == 200 and r.json()["total_tokens"] == 3
        r = client.get("/api/token_counts")
        assert r.json()["total_tokens"] == 3
        r = client.get("/api/config")
        assert r.status_code == 200 and "sk-very-secret" not in r.text
        assert r.json()["endpoints"][0]["status"] == "ok" and r.json()["endpoints"][0]["version"] == "0.9.1"
        r = client.get("/api/stats.csv", params={"from": "2025-01-01"})
        assert r.status_code == 200 and r.text.startswith("timestamp,endpoint,model,")
        r = client.get("/api/stats.csv", params={"from": "never"})
        assert r.status_code == 400
        r = client.post("/api/aggregate_time_series_days", json={"days": 30})
        assert r.json()["status"] == "ok"
        with client.stream("GET", "/api/usage-stream") as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[len("data: ") :])
                    assert "usage_counts" in event and "token_usage_counts" in event
                    break


# -- the client filter (issue 14) --------------------------------------------------------
@sync_to_async
def add_client_rows() -> None:
    for client, tokens in (("team-a", 100), ("team-b", 7), ("operator", 1)):
        TokenTotal.objects.create(
            endpoint=EP1, model="llama3", client=client, input_tokens=tokens, total_tokens=tokens, requests=1
        )
        TokenTimeSeries.objects.create(
            endpoint=EP1,
            model="llama3",
            client=client,
            timestamp=T0,
            input_tokens=tokens,
            total_tokens=tokens,
            requests=1,
        )
    TokenDaily.objects.create(
        endpoint=EP1, model="llama3", client="team-a", day=date(2025, 3, 9), input_tokens=5, total_tokens=5
    )


@pytest.mark.asyncio
async def test_stats_and_csv_sum_clients_and_filter_by_client() -> None:
    await add_client_rows()
    params = {"model": "llama3", "from": "2025-03-09", "to": "2025-03-11"}
    every = body(await call(api_views.stats, post("/api/stats", params)))
    assert every["total_tokens"] == 108 and "client" not in every  # the NOMYO shape, summed over clients
    assert every["range_totals"]["total_tokens"] == 113
    one = body(await call(api_views.stats, post("/api/stats", {**params, "client": "team-a"})))
    assert one["client"] == "team-a" and one["total_tokens"] == 100
    assert one["range_totals"]["total_tokens"] == 105  # its minute and its rolled-up day
    nobody = await call(api_views.stats, post("/api/stats", {**params, "client": "nobody"}))
    assert nobody.status_code == 404
    csv_b = await content(
        await call(api_views.stats_csv, rf.get("/api/stats.csv?from=2025-03-09&to=2025-03-11&client=team-b"))
    )
    assert csv_b.decode().splitlines()[1:] == [f"2025-03-10T00:00:00Z,{EP1},llama3,7,0,7,1,team-b,"]
    csv_all = await content(
        await call(api_views.stats_csv, rf.get("/api/stats.csv?from=2025-03-09&to=2025-03-11"))
    )
    assert [line.rsplit(",", 2)[1] for line in csv_all.decode().splitlines()[1:]] == [
        "team-a",
        "operator",
        "team-a",
        "team-b",
    ]
    totals = body(await call(api_views.token_counts, rf.get("/api/token_counts")))
    assert totals["total_tokens"] == 108 and len(totals["breakdown"]) == 1  # one (endpoint, model) row


@pytest.mark.asyncio
@pytest.mark.parametrize("client", ["\x00", "x" * 101, 5, ["a"]])
async def test_a_bad_client_filter_is_a_400(client: Any) -> None:
    got = await call(api_views.stats, post("/api/stats", {"model": "llama3", "client": client}))
    assert got.status_code == 400 and "client" in body(got)["error"]
