"""Fuzz test (hypothesis) of every routed path with malformed bodies, over real sockets.

The kind under test (issue 11, items 1-2): whatever body a client sends, the router answers
it without a 5xx of its own, in the protocol's error shape when it refuses it, and every
slot it took is back afterwards. Bodies are generated from a full, valid body per route by
putting a wrong value (any JSON value, a 5,000-digit integer, NaN, deep nesting) at any
field path, removing a field, or breaking the bytes (invalid UTF-8, truncation, a
non-object). Each route is tried with a model only an Ollama server has (passthrough) and
one only an OpenAI-compatible server has (translation runs).

One router serves the module, in front of two fakes, limit 2 per endpoint and a short
queue timeout: a leaked slot would show in /metrics and would turn later requests into 503s.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fake_backend import FakeConfig, run_in_thread
from tests.conftest import RouterProcess, start_router, wait_until
from tests.integration.helpers import in_flight

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(600)]

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
HUGE = "__huge_integer__"
DEEP = "__deep_nesting__"
NAN = "__nan__"
DEEPISH = (
    "__nested_850__"  # parses (routing/protocols/common/parsing.py HEADROOM) and must re-encode deeper down
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
OLLAMA_CHAT = {
    "stream": False,
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?", "images": ["aGk="]},
        {
            "role": "assistant",
            "content": "",
            "thinking": "hmm",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "18C"},
    ],
    "tools": TOOLS,
    "options": {"temperature": 0.2, "num_predict": 3, "stop": ["x"], "top_k": 4},
    "format": "json",
    "keep_alive": "5m",
    "think": True,
}
BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "/api/chat": ("POST", OLLAMA_CHAT),
    "/api/generate": (
        "POST",
        {
            "prompt": "hi",
            "system": "be brief",
            "images": ["aGk="],
            "stream": True,
            "options": {"seed": 1, "num_predict": 2},
            "format": {"type": "object"},
            "think": "low",
            "keep_alive": 60,
        },
    ),
    "/api/embed": ("POST", {"input": ["a b", "c"], "dimensions": 4, "keep_alive": "1m"}),
    "/api/embeddings": ("POST", {"prompt": "a b", "keep_alive": "1m"}),
    "/api/show": ("POST", {"verbose": False}),
    "/v1/chat/completions": (
        "POST",
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
            "tools": TOOLS,
            "stream": True,
            "stream_options": {"include_usage": False},
            "max_tokens": 3,
            "temperature": 0.5,
            "stop": "x",
        },
    ),
    "/v1/completions": ("POST", {"prompt": ["a b", [1, 2]], "stream": False, "max_tokens": 2, "seed": 3}),
    "/v1/embeddings": ("POST", {"input": ["a", "b"], "encoding_format": "float"}),
    "/v1/rerank": (
        "POST",
        {"query": "a b", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": True},
    ),
    "/v1/messages": (
        "POST",
        {
            "max_tokens": 3,
            "system": [{"type": "text", "text": "x"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            "stop_sequences": ["x"],
            "stream": False,
        },
    ),
    "/v1/messages/count_tokens": ("POST", {"messages": [{"role": "user", "content": "a"}], "system": "x"}),
    "/api/pull": ("POST", {"insecure": False, "stream": False}),
    "/api/push": ("POST", {"insecure": False, "stream": False}),
    "/api/create": ("POST", {"from": "llama3", "system": "x", "parameters": {"a": 1}, "stream": False}),
    "/api/copy": ("POST", {"source": "llama3", "destination": "scratch"}),
    "/api/delete": ("DELETE", {}),
}
FAN_OUT = {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}
MODELS = ["llama3", "gpt-x"]  # only the Ollama fake has the first, only the OpenAI fake the second


def field_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key and index path inside a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from field_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, index)
            yield from field_paths(item, (*prefix, index))


def put(body: dict[str, Any], path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    target: Any = body
    for step in path[:-1]:
        target = target[step]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "json", "0", "0s", "high", "user", "tool", "-1"])
    | st.sampled_from([HUGE, DEEP, DEEPISH, NAN])
)
junk = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def encode(body: Any) -> bytes:
    data = json.dumps(body).encode()
    data = data.replace(json.dumps(HUGE).encode(), b"7" * 5000)
    data = data.replace(json.dumps(DEEP).encode(), b"[" * 3000 + b"]" * 3000)
    data = data.replace(json.dumps(DEEPISH).encode(), b"[" * 850 + b"]" * 850)
    return data.replace(json.dumps(NAN).encode(), b"NaN")


@st.composite
def malformed(draw: st.DrawFn, path: str) -> bytes:
    _, base = BASES[path]
    body = copy.deepcopy(base)
    if path in FAN_OUT:
        if path != "/api/copy":
            body["model"] = "scratch"  # a name whose pull, create or delete harms no other test
    else:
        body["model"] = draw(st.sampled_from(MODELS))
    paths = list(field_paths(body))
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        where = draw(st.sampled_from(paths))
        try:
            if draw(st.integers(0, 5)) == 0:
                put(body, where, None, delete=True)
            else:
                put(body, where, draw(junk))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed or replaced the path
        paths = list(field_paths(body))
        if not paths:
            break
    data = encode(body)
    breakage = draw(st.integers(0, 9))
    if breakage == 0:
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + b"\xff\xfe" + data[cut:]
    elif breakage == 1:
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif breakage == 2:
        data = encode(draw(junk.filter(lambda v: not isinstance(v, dict))))
    return data


@pytest.fixture(scope="module")
def server(django_db_setup: None, django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[RouterProcess]:
    from routing.models import Endpoint
    from stats.models import TokenTimeSeries, TokenTotal

    ollama = run_in_thread(FakeConfig(kind="ollama", models=["llama3:latest"], tokens=2))
    openai = run_in_thread(FakeConfig(kind="openai", models=["gpt-x"], tokens=2, reranking=True))
    with django_db_blocker.unblock():
        Endpoint.objects.all().delete()
        Endpoint.objects.create(url=ollama.url, name="ollama", max_concurrent_connections=2)
        Endpoint.objects.create(
            url=openai.url + "/v1", name="llamacpp", kind="openai", max_concurrent_connections=2
        )
    proc = start_router(tmp_path_factory.mktemp("fuzz"), ROUTER_QUEUE_TIMEOUT="3")
    try:
        yield proc
    finally:
        proc.stop()
        print(f"--- router log ({proc.url}) ---\n{proc.log()[-20000:]}")
        ollama.stop()
        openai.stop()
        with django_db_blocker.unblock():
            for model in (Endpoint, TokenTotal, TokenTimeSeries):
                model.objects.all().delete()


@pytest.fixture(scope="module")
def client(server: RouterProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def check_reply(response: httpx.Response, path: str) -> None:
    if path == "/v1/rerank" and response.status_code == 501:  # the Ollama-only model: no rerank API
        assert response.json()["error"]["code"] == "rerank_not_supported", response.text
        return
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and "error" in body, body
    if path.startswith("/v1/messages"):  # Anthropic's shape, the server's refusals rewritten too
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
        return
    if response.headers.get("x-router-endpoint"):
        return  # the server's own refusal, passed on
    assert set(body) == {"error"}, body
    if path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    else:
        assert isinstance(body["error"], str) and body["error"], body


@pytest.mark.parametrize("path", list(BASES))
def test_no_malformed_body_gets_a_5xx_or_keeps_a_slot(path: str, server: RouterProcess, client: httpx.Client):
    method = BASES[path][0]

    @FUZZ
    @given(malformed(path))
    def one(body: bytes) -> None:
        check_reply(client.request(method, path, content=body), path)

    one()
    wait_until(lambda: in_flight(server.url) == 0, timeout=10)
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log


def test_the_models_still_answer_on_both_apis_after_the_fuzzing(client: httpx.Client):
    for model in MODELS:
        chat = client.post(
            "/api/chat",
            json={"model": model, "stream": False, "messages": [{"role": "user", "content": "x"}]},
        )
        assert chat.status_code == 200, chat.text
        reply = client.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]}
        )
        assert reply.status_code == 200, reply.text


REPORTED = [  # issue 11, item 1: each of these took a slot of the OpenAI-only model for good
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": [5]}]}, "messages[0].images[0]"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": 5}]}, "messages[0].images"),
    ("/api/chat", {"messages": [{"role": "assistant", "tool_calls": 5}]}, "messages[0].tool_calls"),
    (
        "/api/chat",
        {"messages": [{"role": "assistant", "tool_calls": [{"function": "f"}]}]},
        "messages[0].tool_calls[0].function",
    ),
    ("/api/generate", {"prompt": "hi", "images": [1]}, "images[0]"),
]


@pytest.mark.parametrize(("path", "fields", "named"), REPORTED, ids=[r[2] for r in REPORTED])
def test_the_reported_bodies_answer_400_and_keep_no_slot(
    path: str, fields: dict[str, Any], named: str, server: RouterProcess, client: httpx.Client
):
    for model in MODELS:
        for _ in range(3):  # more than the model's limit of 2
            response = client.post(path, json={"model": model, "stream": False, **fields})
            assert response.status_code == 400, response.text
            assert response.json()["error"].startswith(f"'{named}' must be")
    assert in_flight(server.url) == 0
    valid = client.post(
        "/api/chat",
        json={"model": "gpt-x", "stream": False, "messages": [{"role": "user", "content": "x"}]},
        timeout=2,  # well under the queue timeout: no slot is held
    )
    assert valid.status_code == 200, valid.text
