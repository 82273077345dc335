"""The page and its chart data (stats/views.py, stats/charts.py), through Django's test client."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client

from stats import charts
from stats.models import TokenDaily, TokenTimeSeries

EP1 = "http://a:11434"
EP2 = "http://b:11434"
END = datetime(2025, 5, 1, 15, 30, 20, tzinfo=UTC)


def minute(endpoint: str, at: datetime, inp: int, out: int, model: str = "llama3") -> None:
    TokenTimeSeries.objects.create(
        endpoint=endpoint,
        model=model,
        timestamp=at,
        input_tokens=inp,
        output_tokens=out,
        total_tokens=inp + out,
        requests=1,
    )


@pytest.fixture
def staff_client(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_user("ops", password="x", is_staff=True))
    return client


@pytest.mark.django_db
def test_the_page_and_its_data_are_for_staff_only() -> None:
    client = Client()
    # `/` is answered before Django (routing/server/front.py; tests/integration/test_facade.py).
    for path in ("/dashboard/", "/dashboard/series.json?range=hour"):
        reply = client.get(path)
        assert reply.status_code == 302 and reply["Location"].startswith("/admin/login/")
    client.force_login(User.objects.create_user("visitor", password="x", is_staff=False))
    assert client.get("/dashboard/").status_code == 302
    assert client.get("/dashboard/series.json").status_code == 302


def test_the_page_loads_its_own_script_and_styles(staff_client: Client) -> None:
    html = staff_client.get("/dashboard/").content.decode()
    assert "/static/dashboard/dashboard.js" in html and "/static/dashboard/dashboard.css" in html
    assert 'data-ws-path="/ws/usage/"' in html
    assert 'href="/admin/"' in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere (no CDN)
    for name in ("hour", "day", "week", "month"):
        assert f'data-range="{name}"' in html
    assert staff_client.get("/static/dashboard/dashboard.js").status_code == 200


def test_the_series_rejects_an_unknown_range(staff_client: Client) -> None:
    reply = staff_client.get("/dashboard/series.json?range=year")
    assert reply.status_code == 400 and "range" in reply.json()["error"]


def test_the_series_counts_the_live_minutes(staff_client: Client) -> None:
    from routing.models import Endpoint

    Endpoint.objects.create(url=EP1, name="gpu-a")
    now = datetime.now(tz=UTC).replace(second=0, microsecond=0)
    minute(EP1, now - timedelta(minutes=5), 10, 20)
    minute(EP2, now - timedelta(minutes=5), 1, 2, model="qwen")
    minute(EP1, now - timedelta(minutes=2), 3, 4)
    minute(EP1, now - timedelta(hours=2), 1000, 1000)  # outside the hour
    data = staff_client.get("/dashboard/series.json?range=hour").json()
    assert [(p["input"], p["output"]) for p in data["points"]] == [(11, 22), (3, 4)]
    # The legend's label: the endpoint's name where an endpoint has that url (EP2 has none any more).
    assert data["by_endpoint"] == [
        {"endpoint": EP1, "total": 37, "name": "gpu-a"},
        {"endpoint": EP2, "total": 3, "name": None},
    ]
    assert data["range"] == "hour" and data["from"] < data["to"]


@pytest.mark.django_db
def test_buckets_are_sized_to_the_range() -> None:
    minute(EP1, datetime(2025, 5, 1, 14, 5, tzinfo=UTC), 1, 1)
    minute(EP1, datetime(2025, 5, 1, 14, 55, tzinfo=UTC), 2, 2)
    minute(EP1, datetime(2025, 5, 1, 15, 10, tzinfo=UTC), 4, 4)
    day = charts.series(END - timedelta(days=1), END, "day")
    assert [(p["t"], p["input"]) for p in day["points"]] == [
        ("2025-05-01T14:00:00+00:00", 3),
        ("2025-05-01T15:00:00+00:00", 4),
    ]
    hour = charts.series(END - timedelta(hours=1), END, "hour")
    assert [p["t"] for p in hour["points"]] == ["2025-05-01T14:55:00+00:00", "2025-05-01T15:10:00+00:00"]


@pytest.mark.django_db
def test_rolled_up_days_still_show_in_the_week_and_month_charts() -> None:
    minute(EP1, datetime(2025, 4, 30, 9, 0, tzinfo=UTC), 5, 5)
    TokenDaily.objects.create(
        endpoint=EP2, model="qwen", day=date(2025, 4, 20), input_tokens=70, output_tokens=30, total_tokens=100
    )
    TokenDaily.objects.create(
        endpoint=EP1, model="llama3", day=date(2025, 3, 1), input_tokens=1, output_tokens=1, total_tokens=2
    )  # older than a month
    month = charts.series(END - timedelta(days=30), END, "month")
    assert [(p["t"], p["input"], p["output"]) for p in month["points"]] == [
        ("2025-04-20T00:00:00+00:00", 70, 30),
        ("2025-04-30T00:00:00+00:00", 5, 5),
    ]
    assert month["by_endpoint"] == [{"endpoint": EP1, "total": 10}, {"endpoint": EP2, "total": 100}]
    week = charts.series(END - timedelta(days=7), END, "week")
    assert [p["t"] for p in week["points"]] == ["2025-04-30T09:00:00+00:00"]  # 20 April is older
