"""Migration stats 0002 (issue 14): the token tables gain `client`, and every total counted before
it is kept (as "anonymous"), on whichever database the suite runs (SQLite here, PostgreSQL in CI)."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from tests.stats.migrating import migrate_to_latest, token_models

BEFORE = [("stats", "0001_initial")]
AFTER = [("stats", "0002_token_client")]


@pytest.mark.django_db(transaction=True)
def test_existing_rows_keep_their_totals_and_become_anonymous():
    total, series, daily = token_models(BEFORE)
    total.objects.create(
        endpoint="http://a",
        model="m",
        input_tokens=3,
        output_tokens=4,
        total_tokens=7,
        requests=2,
        incomplete=1,
    )
    total.objects.create(
        endpoint="http://b", model="m", input_tokens=10, output_tokens=0, total_tokens=10, requests=1
    )
    minute = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    series.objects.create(
        endpoint="http://a",
        model="m",
        timestamp=minute,
        input_tokens=3,
        output_tokens=4,
        total_tokens=7,
        requests=2,
    )
    daily.objects.create(
        endpoint="http://a",
        model="m",
        day=date(2025, 12, 1),
        input_tokens=100,
        output_tokens=50,
        total_tokens=150,
        requests=9,
    )
    try:
        total, series, daily = token_models(AFTER)
        assert sorted(
            total.objects.values_list("endpoint", "client", "total_tokens", "requests", "incomplete")
        ) == [
            ("http://a", "anonymous", 7, 2, 1),
            ("http://b", "anonymous", 10, 1, 0),
        ]
        assert list(series.objects.values_list("client", "total_tokens", "requests")) == [("anonymous", 7, 2)]
        assert list(daily.objects.values_list("client", "total_tokens", "requests")) == [
            ("anonymous", 150, 9)
        ]
        # the new unique keys: one row per client for the same (endpoint, model)
        total.objects.create(endpoint="http://a", model="m", client="team", total_tokens=1)
        series.objects.create(endpoint="http://a", model="m", client="team", timestamp=minute, total_tokens=1)
        assert total.objects.filter(endpoint="http://a", model="m").count() == 2
        # and back: 0001's unique keys hold again once the per-client rows are gone
        total.objects.filter(client="team").delete()
        series.objects.filter(client="team").delete()
        assert token_models(BEFORE)[0].objects.count() == 2
    finally:
        migrate_to_latest()
