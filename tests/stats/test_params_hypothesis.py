"""Property tests (hypothesis) of the statistics parameters, in process (the same kinds run
over real sockets in test_hostile_input.py, with fewer examples).

- Any JSON value as `from`, `to`, `bucket` or `days` gives a usable value or the client's
  error (QueryError / a 400 ApiError), never another exception; accepted instants lie in
  the documented window, and every range built from them can be bucketed and paged.
- `spellings` is the class of names routing/names.model_key makes equal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.core.errors import ApiError
from routing.core.names import model_key
from stats import api_views, queries, rollup

pytestmark = pytest.mark.timeout(120)

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ISO = st.builds(
    lambda y, mo, d, t, off: f"{y:04d}-{mo:02d}-{d:02d}{t}{off}",
    st.integers(1, 9999),
    st.integers(1, 12),
    st.integers(1, 28),
    st.sampled_from(["", "T00:00:00", "T23:59:59.999999", "T12:30"]),
    st.sampled_from(["", "Z", "+14:00", "-14:00", "+23:59", "-23:59"]),
)
INSTANTS = (
    ISO
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.none()
    | st.booleans()
    | st.sampled_from(["nan", "-inf", "1e400", "9" * 5000, "²", "٣", " 0 "])
    | st.lists(st.integers(), max_size=2)
)


def _range_or_error(start: Any, end: Any, bucket: Any) -> tuple[datetime, datetime, str] | None:
    try:
        low, high = queries.resolve_range(start, end)
        return low, high, queries.choose_bucket(bucket, low, high)
    except queries.QueryError:
        return None


@PROPERTY
@given(
    start=INSTANTS, end=INSTANTS, bucket=st.none() | st.sampled_from(["minute", "hour", "day", "week", ""])
)
def test_any_range_is_usable_or_the_clients_error(start: Any, end: Any, bucket: Any) -> None:
    found = _range_or_error(start, end, bucket)
    if found is None:
        return
    low, high, chosen = found
    assert low < high and high <= queries.LATEST
    # every computation the routes make on an accepted range succeeds
    queries.floor_to(low, chosen)  # type: ignore[arg-type]
    queries.bucket_count(low, high, chosen)  # type: ignore[arg-type]
    queries.daily_days(low, high)
    api_views._iso(low)
    api_views._unix(high)


@PROPERTY
@given(value=INSTANTS)
def test_an_accepted_instant_lies_in_the_window(value: Any) -> None:
    try:
        moment = queries.parse_instant(value, "to")
    except queries.QueryError as exc:
        assert "'to'" in str(exc) and len(str(exc)) < 300  # names the field, never echoes megabytes
        return
    assert moment.tzinfo is not None and queries.EARLIEST <= moment <= queries.LATEST


def test_the_window_edges() -> None:
    assert queries.parse_instant("1970-01-01", "from") == queries.EARLIEST
    assert queries.parse_instant(0, "from") == queries.EARLIEST
    assert queries.parse_instant("9999-01-01T00:00:00Z", "to") == queries.LATEST
    for outside in ("1969-12-31T23:59:59", -1, "9999-01-01T00:00:01", "0001-01-01T00:00:00+14:00"):
        with pytest.raises(queries.QueryError, match="between 1970-01-01T00:00:00Z and 9999-01-01"):
            queries.parse_instant(outside, "to")
    end = datetime(1970, 1, 5, tzinfo=UTC)  # the default start may lie before the window: fine
    assert queries.resolve_range(None, "1970-01-05") == (end - timedelta(days=30), end)


@PROPERTY
@given(value=st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10))
def test_days_is_in_range_or_a_400(value: Any) -> None:
    try:
        days = api_views._days_param(value)
    except ApiError as err:
        assert err.status == 400
        return
    assert 1 <= days <= rollup.MAX_DAYS
    rollup.cutoff_for(days)


NAMES = st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,15}(:[a-z0-9._-]{1,8})?", fullmatch=True)


@PROPERTY
@given(name=NAMES, pad=st.sampled_from(["", " ", "\t"]))
def test_spellings_are_the_names_model_key_makes_equal(name: str, pad: str) -> None:
    names = queries.spellings(pad + name + pad)
    assert model_key(name) in names
    assert {model_key(n) for n in names} == {model_key(name)}  # one model, whatever is stored
    for other in names:  # the same class from any member
        assert set(queries.spellings(other)) - {pad + name + pad} == set(names) - {pad + name + pad}
    if ":" not in name.rsplit("/", 1)[-1]:
        assert {name, f"{name}:latest"} <= set(names)
    else:
        assert name in names and not any(
            n.endswith(":latest") and n != name for n in names if n != model_key(name)
        )
