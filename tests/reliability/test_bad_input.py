"""A catalogue of malformed requests for every proxy route: each gets the right 4xx in its
protocol's own error shape (Ollama `{"error": "..."}`, OpenAI `{"error": {message, type,
param, code}}` under /v1/), with a request id, never a 500 and never a traceback.

One router serves the whole catalogue (started once for this module, ROUTER_MAX_BODY
small so oversized bodies are cheap to send).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bench.fake_backend import FakeConfig, run_in_thread
from tests.conftest import RouterProcess, start_router
from tests.reliability.support import MODEL_KEY

MAX_BODY = 16 * 1024

# The tests use no database themselves; the mark makes pytest-django create the test
# database, which the module's router process reads.
pytestmark = pytest.mark.django_db

# route -> the smallest valid body apart from the model
ROUTED: dict[str, dict[str, Any]] = {
    "/api/chat": {"messages": []},
    "/api/generate": {"prompt": "hi"},
    "/api/embed": {"input": "hi"},
    "/api/embeddings": {"prompt": "hi"},
    "/api/show": {},
    "/v1/chat/completions": {"messages": []},
    "/v1/completions": {"prompt": "hi"},
    "/v1/embeddings": {"input": "hi"},
}
FAN_OUT = {"/api/pull": "POST", "/api/push": "POST", "/api/create": "POST", "/api/copy": "POST"}
FAN_OUT["/api/delete"] = "DELETE"
BODY_ROUTES = {**{path: "POST" for path in ROUTED}, **FAN_OUT}
GET_ROUTES = ["/api/tags", "/api/ps", "/api/version", "/v1/models", "/metrics"]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None
    status: int


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


NOT_AN_OBJECT = {
    "empty body": b"",
    "blank body": b" \r\n\t ",
    "form encoded": b"model=llama3&stream=false",
    "truncated json": b'{"model": "llama3", "messages": [',
    "trailing garbage": b'{"model": "llama3"} x',
    "json array": b'[{"model": "llama3"}]',
    "json string": b'"llama3"',
    "json number": b"42",
    "json null": b"null",
    "json true": b"true",
    "invalid utf-8": b'{"model": "llama3\xff\xfe"}',
    "utf-16": '{"model": "llama3"}'.encode("utf-16"),
    "utf-8 bom": b'\xef\xbb\xbf{"model": "llama3"}',
    "single quotes": b"{'model': 'llama3'}",
    "deep nesting": b'{"model": "llama3", "x": ' + b"[" * 6000 + b"]" * 6000 + b"}",
    "nul byte": b'{"model": "llama3"}\x00',
}

BAD_MODEL_VALUES: dict[str, Any] = {
    "model number": 42,
    "model true": True,
    "model list": ["llama3"],
    "model object": {"name": "llama3"},
    "model null": None,
    "model empty": "",
    "model blank": "   ",
    "model tab": "\t",
    "model newline": "llama3\nx",
    "model nul": "llama\u0000",
    "model escape": "\u001b[31mred",
    "model 501 chars": "x" * 501,
    "model lone surrogate": "\ud800",  # valid JSON, not storable as UTF-8 (as /api/stats says)
    "model leading blank": " llama3",  # the routes and /api/stats accept the same spellings
    "model trailing blank": "llama3 ",
}

ODD_BUT_VALID_NAMES = [
    "nope",
    "../../etc/passwd",
    "a b",
    "模型:latest",
    "x" * 500,
    ":",
    "/",
    "llama3:latest:extra",
    "%00",
    "llama3:",
    "<script>alert(1)</script>",
    "llama3?x=1#y",
]

# route -> {field: wrong value}: each field the router checks, with the wrong type
WRONG_TYPES: dict[str, list[tuple[str, Any]]] = {
    "/api/chat": [
        ("messages", "hi"),
        ("messages", {"role": "user"}),
        ("tools", {}),
        ("options", []),
        ("format", 5),
        ("stream", "false"),
        ("stream", 1),
    ],
    "/api/generate": [
        ("prompt", 5),
        ("prompt", ["hi"]),
        ("system", []),
        ("images", "x"),
        ("options", "x"),
        ("format", []),
        ("stream", "no"),
    ],
    "/api/embed": [("input", 5), ("input", {"x": 1}), ("options", [])],
    "/api/embeddings": [("prompt", []), ("options", 5)],
    "/v1/chat/completions": [
        ("messages", "hi"),
        ("tools", "x"),
        ("stream", "true"),
        ("stream", 0),
        ("stream_options", "x"),
        ("stream_options", []),
    ],
    "/v1/completions": [("prompt", 5), ("prompt", {}), ("stream", 1), ("stream_options", 1)],
    "/v1/embeddings": [("input", 5), ("input", {}), ("input", None)],
}

FAN_OUT_BAD: list[tuple[str, dict[str, Any]]] = [
    ("/api/pull", {}),
    ("/api/pull", {"model": 5}),
    ("/api/pull", {"model": " "}),
    ("/api/pull", {"model": "llama3", "stream": "yes"}),
    ("/api/push", {"name": []}),
    ("/api/push", {"model": "llama3", "stream": 1}),
    ("/api/create", {"model": None}),
    ("/api/create", {"model": ""}),
    ("/api/copy", {}),
    ("/api/copy", {"source": "llama3"}),
    ("/api/copy", {"source": "llama3", "destination": 5}),
    ("/api/copy", {"source": "", "destination": "x"}),
    ("/api/delete", {}),
    ("/api/delete", {"model": []}),
    ("/api/delete", {"name": ""}),
]

UNKNOWN_ROUTES = [
    ("GET", "/api/nope"),
    ("POST", "/api/chat/"),
    ("POST", "/api//chat"),
    ("POST", "/api/CHAT"),
    ("GET", "/api"),
    ("GET", "/api/tags/extra"),
    ("POST", "/v1/nope"),
    ("POST", "/v1/chat/completions/"),
    ("GET", "/v1/models/"),
    ("POST", "/v1/responses"),
]


def catalogue() -> Iterator[Case]:
    for name, body in NOT_AN_OBJECT.items():
        for path, method in BODY_ROUTES.items():
            yield Case(f"{name} {method} {path}", method, path, body, 400)
    for path, base in ROUTED.items():
        for name, value in BAD_MODEL_VALUES.items():
            yield Case(f"{name} {path}", "POST", path, _json({**base, "model": value}), 400)
        yield Case(f"model missing {path}", "POST", path, _json(base), 400)
        for name in ODD_BUT_VALID_NAMES:
            yield Case(f"unknown model {name!r} {path}", "POST", path, _json({**base, "model": name}), 404)
    for path, wrong in WRONG_TYPES.items():
        for field, value in wrong:
            fields = {**ROUTED[path], "model": "llama3", field: value}
            yield Case(f"{field}={value!r} {path}", "POST", path, _json(fields), 400)
    yield Case("input missing /v1/embeddings", "POST", "/v1/embeddings", _json({"model": "llama3"}), 400)
    for path, fields in FAN_OUT_BAD:
        yield Case(f"{fields!r} {path}", FAN_OUT[path], path, _json(fields), 400)
    for path in BODY_ROUTES:
        yield Case(f"wrong method GET {path}", "GET", path, None, 405)
        yield Case(f"wrong method PATCH {path}", "PATCH", path, _json({"model": "llama3"}), 405)
    yield Case("wrong method POST /api/delete", "POST", "/api/delete", _json({"model": "x"}), 405)
    for path in GET_ROUTES:
        for method in ("POST", "PUT", "DELETE"):
            yield Case(f"wrong method {method} {path}", method, path, b"{}", 405)
    for method, path in UNKNOWN_ROUTES:
        yield Case(f"unknown route {method} {path}", method, path, None, 404)
    too_big = _json({"model": "llama3", "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    for path, method in BODY_ROUTES.items():
        yield Case(f"body over the limit {path}", method, path, too_big, 413)
    yield Case("body over the limit GET /api/tags", "GET", "/api/tags", b"x" * (MAX_BODY + 1), 413)
    yield Case("body over the limit on an unknown route", "POST", "/v1/nope", too_big, 413)
    yield Case("body of 4 MB", "POST", "/v1/chat/completions", b"{" * (4 << 20), 413)


CASES = list(catalogue())


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[RouterProcess]:
    """One router for the whole catalogue, in front of one fake that has only `llama3`."""
    from routing.models import Endpoint
    from stats.models import TokenTimeSeries, TokenTotal

    fake = run_in_thread(FakeConfig(models=[MODEL_KEY]))
    with django_db_blocker.unblock():
        Endpoint.objects.all().delete()
        Endpoint.objects.create(url=fake.url, name="solo", max_concurrent_connections=4)
    proc = start_router(tmp_path_factory.mktemp("bad-input"), ROUTER_MAX_BODY=str(MAX_BODY))
    try:
        yield proc
    finally:
        proc.stop()
        print(f"--- router log ({proc.url}) ---\n{proc.log()[-20000:]}")
        fake.stop()
        with django_db_blocker.unblock():
            # what this module and its router wrote, outside any test's transaction
            for model in (Endpoint, TokenTotal, TokenTimeSeries):
                model.objects.all().delete()


@pytest.fixture(scope="module")
def client(server: RouterProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


def assert_error_shape(response: httpx.Response, path: str) -> None:
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("x-request-id")
    assert "Traceback" not in response.text
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    if path.startswith("/v1/"):
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
    else:
        assert isinstance(body["error"], str) and body["error"], body


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_it_answers_a_malformed_request_with_the_right_4xx_in_the_protocols_shape(
    case: Case, server: RouterProcess, client: httpx.Client
):
    response = client.request(case.method, case.path, content=case.body)
    assert response.status_code == case.status, response.text
    assert_error_shape(response, case.path)
    if case.status == 405:
        allowed = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
        assert allowed and case.method not in allowed
    if case.id.startswith("unknown model") and case.path.startswith("/v1/"):
        assert response.json()["error"]["code"] == "model_not_found"
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log


def test_it_answers_a_chunked_body_over_the_limit_with_413(server: RouterProcess, client: httpx.Client):
    def pieces() -> Iterator[bytes]:
        for _ in range(8):
            yield b" " * 4096  # no Content-Length: the router counts what arrives

    for path in ("/api/chat", "/v1/chat/completions"):
        response = client.post(path, content=pieces())
        assert response.status_code == 413
        assert_error_shape(response, path)


def test_it_still_serves_well_formed_requests_after_the_catalogue(client: httpx.Client):
    response = client.post("/api/chat", json={"model": "llama3", "messages": [], "stream": False})
    assert response.status_code == 200 and response.headers["x-router-endpoint"] == "solo"
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics
    assert not [line for line in metrics.splitlines() if line.startswith("router_in_flight{")]
