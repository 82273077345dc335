"""The model the client asked for, beside the model that served (issue 15: aliases and fallback
chains): migration stats 0003 keeps every total (rows counted before are "asked for what served",
blank), the recorder keeps the two apart through its buffers, the flush and the roll-up, and the
NOMYO-compatible totals per (endpoint, model) still sum every row of the real model."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from routing.auth.principal import ANONYMOUS
from routing.engine.accounting import Counts
from stats import queries
from stats.models import TokenDaily, TokenTimeSeries, TokenTotal
from stats.recorder import recorder
from stats.rollup import roll_up
from tests.stats.migrating import migrate_to_latest, token_models

BEFORE = [("stats", "0002_token_client")]
AFTER = [("stats", "0003_requested_model")]
EP = "http://a:11434"


@pytest.mark.django_db(transaction=True)
def test_existing_rows_keep_their_totals_with_a_blank_requested_model():
    total, series, daily = token_models(BEFORE)
    total.objects.create(
        endpoint=EP, model="m", client="team", input_tokens=3, output_tokens=4, total_tokens=7, requests=2
    )
    minute = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    series.objects.create(endpoint=EP, model="m", timestamp=minute, total_tokens=7, requests=2)
    daily.objects.create(endpoint=EP, model="m", day=date(2025, 12, 1), total_tokens=150, requests=9)
    try:
        total, series, daily = token_models(AFTER)
        assert list(total.objects.values_list("client", "requested_model", "total_tokens", "requests")) == [
            ("team", "", 7, 2)
        ]
        assert list(series.objects.values_list("requested_model", "total_tokens")) == [("", 7)]
        assert list(daily.objects.values_list("requested_model", "total_tokens")) == [("", 150)]
        # the new unique keys: the same real model asked for under another name is its own row
        total.objects.create(
            endpoint=EP, model="m", client="team", requested_model="alias:latest", total_tokens=1
        )
        assert total.objects.filter(endpoint=EP, model="m", client="team").count() == 2
        total.objects.filter(requested_model="alias:latest").delete()
        assert token_models(BEFORE)[0].objects.count() == 1
    finally:
        migrate_to_latest()


@pytest.fixture
def clean_recorder():
    recorder.clear()
    yield
    recorder.clear()


@pytest.mark.django_db
def test_the_recorder_keeps_the_requested_model_apart_and_the_pair_totals_whole(clean_recorder):
    recorder.record(ANONYMOUS, EP, "gpt-oss:120b", Counts(3, 4))
    recorder.record(ANONYMOUS, EP, "gpt-oss:120b", Counts(10, 20), requested="gpt-oss:latest")
    recorder.incomplete(ANONYMOUS, EP, "gpt-oss:120b", requested="gpt-4:latest")
    assert recorder.totals() == {(EP, "gpt-oss:120b"): (13, 24, 37)}  # the real model's whole
    recorder.flush_sync()
    rows = sorted(TokenTotal.objects.values_list("requested_model", "total_tokens", "requests", "incomplete"))
    assert rows == [("", 7, 1, 0), ("gpt-4:latest", 0, 1, 1), ("gpt-oss:latest", 30, 1, 0)]
    minute = sorted(TokenTimeSeries.objects.values_list("model", "requested_model", "total_tokens"))
    assert minute == [
        ("gpt-oss:120b", "", 7),
        ("gpt-oss:120b", "gpt-4:latest", 0),
        ("gpt-oss:120b", "gpt-oss:latest", 30),
    ]
    assert queries.model_totals("gpt-oss:120b") is not None
    assert queries.model_totals("gpt-oss:120b").total_tokens == 37  # type: ignore[union-attr]
    recorder.record(ANONYMOUS, EP, "gpt-oss:120b", Counts(1, 1), requested="gpt-oss:latest")
    recorder.flush_sync()  # the atomic upsert adds to the right row
    assert TokenTotal.objects.get(requested_model="gpt-oss:latest").total_tokens == 32


@pytest.mark.django_db
def test_the_roll_up_keeps_the_requested_model_apart_and_every_total():
    at = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    for i, asked in enumerate(["", "alias:latest", "", "alias:latest"]):
        TokenTimeSeries.objects.create(
            endpoint=EP,
            model="m:latest",
            requested_model=asked,
            timestamp=at + timedelta(minutes=i),
            input_tokens=i,
            output_tokens=1,
            total_tokens=i + 1,
            requests=1,
        )
    result = roll_up(30, now=datetime(2025, 5, 1, tzinfo=UTC))
    assert (result.groups, result.rows) == (2, 4)
    assert sorted(TokenDaily.objects.values_list("requested_model", "total_tokens", "requests")) == [
        ("", 4, 2),
        ("alias:latest", 6, 2),
    ]
