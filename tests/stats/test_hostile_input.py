"""Hostile input on every statistics route and page, over real sockets: never a 5xx, never
a traceback, at most one log line a request (issue 11, item 2).

One router process (daphne, as `make run` starts it) serves the whole module; its log
(stdout and stderr) is read after every request. A request on the lean path must add
exactly its access line (`routing.access`, which carries the X-Request-Id the test
sends); a page request may add the server's access line and at most one more line.

Hypothesis generates query strings and JSON bodies from values of the kinds that used to
end in a 500: dates at and past the ends of the calendar, with and without offsets, unix
seconds of any size, integers longer than Python's 4,300-digit conversion limit, floats
with NaN and infinities, numeric strings in other scripts, lone surrogates, nested
containers, raw bytes and percent-encoding that decodes to nothing sensible.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from tests.conftest import RouterProcess, start_router
from tests.stats.live import cookie_header, staff_session

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(600)]

FUZZ = settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
)

# The lean routes of the statistics API, with the method each answers.
STATS_ROUTES = {
    "/api/stats": "POST",
    "/api/stats.csv": "GET",
    "/api/aggregate_time_series_days": "POST",
    "/api/usage": "GET",
    "/api/token_counts": "GET",
    "/api/config": "GET",
}
PAGES = ["/", "/dashboard/", "/dashboard/series.json"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
MODEL_KEY = "gemma3-270m:latest"
DAYS_AGO = 2
# daphne's access line: `127.0.0.1:4711 - - [29/Nov/2026:15:00:00] "GET /x" 404 179`
DAPHNE_ACCESS = re.compile(r'^\S+ - - \[[^\]]+\] "')
# an access line of either path: daphne's (Django's pages) or the router's own (lean path)
ANY_ACCESS = re.compile(DAPHNE_ACCESS.pattern + r"| INFO routing\.access ")

QUERY_BUDGET = 12_000  # characters of query string per request
BIG = "\x00big\x00"  # replaced by a 5,000-digit integer in the JSON text
BIG_DIGITS = "7" * 5000


# -- the router and its log ----------------------------------------------------------
@dataclass
class Served:
    proc: RouterProcess
    http: httpx.Client
    session: str


@pytest.fixture(scope="module")
def served(django_db_setup: None, django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[Served]:
    """One router, a staff session, and token rows for the model (some stored under the
    bare spelling, as older versions did)."""
    from django.contrib.auth.models import User

    from stats.models import TokenDaily, TokenTimeSeries, TokenTotal

    moment = (datetime.now(tz=UTC) - timedelta(days=DAYS_AGO)).replace(second=0, microsecond=0)
    with django_db_blocker.unblock():
        TokenTotal.objects.create(
            endpoint="http://a:1",
            model=MODEL_KEY,
            input_tokens=3,
            output_tokens=4,
            total_tokens=7,
            requests=2,
        )
        TokenTimeSeries.objects.create(
            endpoint="http://a:1", model=MODEL_KEY, timestamp=moment, input_tokens=3, output_tokens=4,
            total_tokens=7, requests=2,
        )  # fmt: skip
        session = staff_session("hostile-ops")
    proc = start_router(tmp_path_factory.mktemp("hostile"))
    try:
        with httpx.Client(base_url=proc.url, timeout=20) as http:
            yield Served(proc, http, session)
    finally:
        proc.stop()
        print(f"--- router log ({proc.url}) ---\n{proc.log()[-20000:]}")
        with django_db_blocker.unblock():
            for model in (TokenTotal, TokenTimeSeries, TokenDaily, User):
                model.objects.all().delete()


class LogSlice:
    """The lines the router logs from now on."""

    def __init__(self, proc: RouterProcess) -> None:
        self.path = proc.log_path
        self.start = self.path.stat().st_size

    def lines(self) -> list[str]:
        with open(self.path, "rb") as fh:
            fh.seek(self.start)
            data = fh.read()
        return data.decode("utf-8", "replace").splitlines()

    def wait_for(self, needle: re.Pattern[str] | str, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if any((needle.search(x) if isinstance(needle, re.Pattern) else needle in x) for x in lines):
                time.sleep(0.02)  # anything logged just after it arrives too
                return self.lines()
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {needle!r}; got {lines}")
            time.sleep(0.01)


_ids = iter(range(10**9))


def send_lean(
    served: Served, method: str, path: str, query: str = "", body: bytes | None = None
) -> httpx.Response:
    """One request on the lean path; asserts no 5xx, the Ollama error shape, and that the
    request added exactly one log line, its access line."""
    request_id = f"hostile-{os.getpid()}-{next(_ids)}"
    log = LogSlice(served.proc)
    url = path + ("?" + query if query else "")
    response = served.http.request(
        method, url, content=body, headers={"X-Request-Id": request_id, "Content-Type": "application/json"}
    )
    assert response.status_code < 500, (method, url, body and body[:300], response.text[:500])
    if response.status_code >= 400 and method != "HEAD":
        assert response.headers["content-type"] == "application/json", response.headers
        data = response.json()
        assert isinstance(data, dict) and set(data) == {"error"} and isinstance(data["error"], str), data
        assert data["error"] and "Traceback" not in data["error"]
    lines = log.wait_for(f"request_id={request_id}")
    assert "Traceback" not in "\n".join(lines), lines
    assert len(lines) == 1 and "routing.access" in lines[0], lines
    return response


def send_page(served: Served, method: str, path: str, query: str, *, staff: bool) -> httpx.Response:
    """One request for a page: no 5xx, and besides the access line at most one line,
    without a traceback."""
    log = LogSlice(served.proc)
    headers = {"Cookie": cookie_header(served.session)} if staff else {}
    url = path + ("?" + query if query else "")
    response = served.http.request(method, url, headers=headers)
    assert response.status_code < 500, (method, url, response.text[:500])
    lines = log.wait_for(ANY_ACCESS)
    others = [line for line in lines if not ANY_ACCESS.search(line)]
    assert "Traceback" not in "\n".join(lines), lines
    assert len(others) <= 1, lines
    return response


def ws_connect(url: str, origin: str, headers: dict[str, str] | None = None) -> ClientConnection:
    return connect(
        url, origin=Origin(origin), additional_headers=headers or {}, open_timeout=10, max_size=2**24,
        proxy=None,
    )  # fmt: skip


# -- strategies ----------------------------------------------------------------------
YEARS = st.sampled_from([1, 2, 1969, 1970, 2025, 9998, 9999]) | st.integers(1, 9999)
OFFSETS = st.sampled_from(["", "Z", "+00:00", "+14:00", "-14:00", "+23:59", "-23:59", "+24:00", "+5"])


@st.composite
def iso_times(draw: st.DrawFn) -> str:
    year, month, day = draw(YEARS), draw(st.integers(0, 13)), draw(st.integers(0, 32))
    text = f"{year:04d}-{month:02d}-{day:02d}"
    if draw(st.booleans()):
        text += "T" + draw(st.sampled_from(["00:00:00", "23:59:59", "23:59:59.999999", "24:00", "12"]))
        text += draw(OFFSETS)
    return text


NUMERIC_TEXT = st.sampled_from(
    ["1e400", "-1e400", "nan", "inf", "-inf", "  5 ", "²", "٣", "0x10", "1_000", "", " ", "9" * 5000,
     "-62135596800", "253402300800", "-1", "0", "1.5", "3" * 30]
)  # fmt: skip
ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "m\x1f", "x" * 600, "🦙", "minute", "day", "hour"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 1, 36500, 36501, 100_000_000, 2**63, -(2**63), 10**20, -(10**20)])
    | st.just(BIG)
    | st.floats()  # NaN and infinities become JSON's NaN / Infinity tokens, which Python accepts
    | iso_times()
    | NUMERIC_TEXT
    | ODD_TEXT
    | st.sampled_from(["gemma3-270m", MODEL_KEY, "gemma3-270m:latest ", "nope"])
    | st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
KEYS = st.sampled_from(["model", "from", "to", "bucket", "days", "trim_old", "range"]) | st.text(max_size=8)


def json_text(value: Any) -> bytes:
    text = json.dumps(value, allow_nan=True)
    return text.replace(json.dumps(BIG), BIG_DIGITS).encode("utf-8", "surrogatepass")


RAW_BODIES = st.sampled_from(
    [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b'{"days": ' + BIG_DIGITS.encode() + b"}",
     b'{"model": "m"' + b', "x": [' * 3000 + b"]" * 3000 + b"}", b'{"from": NaN, "to": Infinity}',
     b'{"days": -Infinity}', b"\xef\xbb\xbf{}", b'{"model": "\\ud800"}']
) | st.binary(max_size=64)  # fmt: skip
BODIES = st.dictionaries(KEYS, VALUES, max_size=5).map(json_text) | RAW_BODIES


def query_value(value: Any) -> str:
    if isinstance(value, str):
        return value.replace(BIG, BIG_DIGITS)
    return json_text(value).decode("utf-8", "surrogatepass")


def _quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@st.composite
def query_strings(draw: st.DrawFn) -> str:
    pairs = draw(st.lists(st.tuples(KEYS, SCALARS.map(query_value)), max_size=5))
    parts = [f"{_quoted(k)}={_quoted(v)}" for k, v in pairs]
    parts += draw(
        st.lists(st.sampled_from(["%", "%zz", "%ff%fe", "=", "&&", "a=%C0%80", "from"]), max_size=2)
    )
    # daphne (Twisted) refuses a request line plus headers over 16 KiB before the router sees it
    kept: list[str] = []
    for part in parts:
        if sum(map(len, kept)) + len(part) < QUERY_BUDGET:
            kept.append(part)
    return "&".join(kept)


# -- the examples, one by one ------------------------------------------------
EXAMPLES = [
    ("POST", "/api/stats", "", {"model": MODEL_KEY, "to": "0001-01-01"}),
    ("POST", "/api/stats", "", {"model": MODEL_KEY, "from": "0001-01-01T00:00:00+14:00"}),
    ("POST", "/api/stats", "", {"model": MODEL_KEY, "to": "9999-12-31T23:59:59-14:00"}),
    ("POST", "/api/stats", "", {"model": MODEL_KEY, "from": -1e18}),
    ("POST", "/api/stats", "", {"model": MODEL_KEY, "to": 1e300}),
    ("POST", "/api/stats", "", {"model": MODEL_KEY, "from": 0, "to": "9998-12-31", "bucket": "minute"}),
    ("POST", "/api/stats", "", {"model": "a\ud800b"}),
    ("POST", "/api/stats", "", {"model": MODEL_KEY, "to": BIG}),
    ("GET", "/api/stats.csv", "to=9999-12-31T23:59:59", None),
    ("GET", "/api/stats.csv", "from=0001-01-01", None),
    ("GET", "/api/stats.csv", "to=" + BIG_DIGITS, None),
    ("POST", "/api/aggregate_time_series_days", "", {"days": 100000000}),
    ("POST", "/api/aggregate_time_series_days", "", {"days": "²"}),
    ("POST", "/api/aggregate_time_series_days", "", {"days": "9" * 5000}),
    ("POST", "/api/aggregate_time_series_days", "", {"days": BIG}),
]


@pytest.mark.parametrize(("method", "path", "query", "data"), EXAMPLES)
def test_the_reported_inputs_answer_400_in_ollamas_shape(
    served: Served, method: str, path: str, query: str, data: Any
) -> None:
    body = json_text(data) if data is not None else None
    assert send_lean(served, method, path, query, body).status_code == 400


def test_too_many_query_parameters_are_a_400_on_the_stats_routes_and_never_a_500(served: Served) -> None:
    query = "&".join(f"p{i}=1" for i in range(1001))  # DATA_UPLOAD_MAX_NUMBER_FIELDS is 1000
    for path, method in STATS_ROUTES.items():
        body = json_text({"model": MODEL_KEY}) if method == "POST" else None
        response = send_lean(served, method, path, query, body)
        if path in ("/api/stats", "/api/stats.csv"):  # the routes that read the query string
            assert response.status_code == 400 and "DATA_UPLOAD_MAX_NUMBER_FIELDS" in response.json()["error"]
    for path in ("/api/tags", "/v1/models", "/api/chat"):  # routes that ignore it: no 5xx either
        send_lean(served, "POST" if path == "/api/chat" else "GET", path, query, b"{}")
    for path in PAGES:
        assert send_page(served, "GET", path, query, staff=True).status_code in (200, 400)


def test_a_websocket_to_an_unknown_path_is_refused_at_the_handshake_without_a_traceback(
    served: Served,
) -> None:
    base = served.proc.url.replace("http://", "ws://")
    for path in ("/ws/nope/", "/", "/api/chat", "/ws/usage/extra", "/ws/usage"):
        log = LogSlice(served.proc)
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(base + path, served.proc.url)
        assert refused.value.response.status_code == 403
        time.sleep(0.3)  # anything the refusal logs arrives meanwhile
        lines = [x for x in log.lines() if not DAPHNE_ACCESS.search(x) and "WSREJECT" not in x]
        assert lines == [], lines


def test_under_uvicorn_bad_handshakes_are_refused_too(served: Served, tmp_path: Any) -> None:
    proc = start_router(tmp_path, server="uvicorn")
    try:
        ready = LogSlice(proc)
        ready.start = 0
        ready.wait_for("routing.access")  # the start-up probe's line is in before we look
        base = proc.url.replace("http://", "ws://")
        cookie = {"Cookie": cookie_header(served.session)}
        cases = [
            ("/ws/nope/", proc.url),
            ("/ws/usage/", "http://["),
            ("/ws/usage/", "http://127.0.0.1:99999"),
        ]
        for path, origin in cases:
            log = LogSlice(proc)
            with pytest.raises(InvalidStatus) as refused:
                ws_connect(base + path, origin, cookie)
            assert refused.value.response.status_code in (400, 403)
            time.sleep(0.3)
            # only uvicorn's own INFO lines about the refusal (its websocket log has no switch)
            lines = log.lines()
            assert all(line.startswith("INFO:") for line in lines) and len(lines) <= 2, lines
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "origin", ["http://[", "http://127.0.0.1:99999", "http://127.0.0.1:port", "null", "http://evil.example"]
)
def test_a_usage_websocket_with_a_bad_origin_is_refused_without_a_traceback(
    served: Served, origin: str
) -> None:
    url = served.proc.url.replace("http://", "ws://") + "/ws/usage/"
    log = LogSlice(served.proc)
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, origin, {"Cookie": cookie_header(served.session)})
    assert refused.value.response.status_code in (400, 403)  # daphne itself refuses what it cannot parse
    time.sleep(0.3)
    assert [x for x in log.lines() if not DAPHNE_ACCESS.search(x) and "WSREJECT" not in x] == []


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1:99999", "[", "a b", "x" * 300])
def test_a_page_asked_for_another_host_is_a_400_on_one_line(served: Served, host: str) -> None:
    log = LogSlice(served.proc)
    response = served.http.get("/dashboard/", headers={"Host": host})
    # a host outside ALLOWED_HOSTS is refused; 127.0.0.1 with an odd port is the login redirect
    assert response.status_code == (302 if host.startswith("127.0.0.1") else 400)
    lines = log.wait_for(DAPHNE_ACCESS)
    assert "Traceback" not in "\n".join(lines) and len(lines) <= 2, lines


def test_junk_frames_on_the_usage_websocket_are_ignored(served: Served) -> None:
    url = served.proc.url.replace("http://", "ws://") + "/ws/usage/"
    log = LogSlice(served.proc)
    with ws_connect(url, served.proc.url, {"Cookie": cookie_header(served.session)}) as ws:
        assert "endpoints" in json.loads(ws.recv(timeout=10))
        for frame in ("not json", "{", "[1, 2]", "\x00", b"\xff\xfe"):
            ws.send(frame)
        ws.ping().wait(5)  # the consumer is still there and answering
    time.sleep(0.3)
    assert "Traceback" not in "\n".join(log.lines())


# -- generated input -----------------------------------------------------------------
@FUZZ
@given(path=st.sampled_from(sorted(STATS_ROUTES)), query=query_strings(), body=BODIES)
def test_no_query_string_or_body_makes_a_stats_route_fail(
    served: Served, path: str, query: str, body: bytes
) -> None:
    method = STATS_ROUTES[path]
    send_lean(served, method, path, query, body if method == "POST" else None)


@FUZZ
@given(path=st.sampled_from([*sorted(STATS_ROUTES), "/api/usage-stream"]), method=st.sampled_from(METHODS))
def test_no_method_makes_a_stats_route_fail(served: Served, path: str, method: str) -> None:
    if path == "/api/usage-stream" and method == "GET":
        return  # endless by design; tested below
    send_lean(served, method, path, "", b"{}")


def test_the_usage_stream_ignores_its_query_string(served: Served) -> None:
    query = "from=0001-01-01&to=" + BIG_DIGITS[:100] + "&%zz"
    with served.http.stream("GET", "/api/usage-stream?" + query) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: {")


@FUZZ
@given(
    path=st.sampled_from(PAGES),
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    query=query_strings(),
    staff=st.booleans(),
)
def test_no_query_string_makes_a_page_fail(
    served: Served, path: str, method: str, query: str, staff: bool
) -> None:
    response = send_page(served, method, path, query, staff=staff)
    if path == "/dashboard/series.json" and staff and method == "GET" and response.status_code == 400:
        assert set(response.json()) == {"error"}
