"""The probes of one endpoint (routing/fleet/probes.py): whatever a server answers (any status,
any bytes, any JSON), a probe returns its value or raises ProbeError, nothing else; model names
become matching keys; a pooled connection closed while idle is retried once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.core.names import model_key
from routing.fleet import probes
from routing.fleet.registry import EndpointInfo
from routing.upstream import client as upstream_client

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
# Shapes near the real ones, so the interesting branches are reached often.
ENTRY = st.dictionaries(st.sampled_from(["name", "model", "id", "size"]), JSON, max_size=3)
NEAR_REPLY = st.fixed_dictionaries(
    {}, optional={"models": st.lists(ENTRY | JSON, max_size=4), "data": st.lists(ENTRY | JSON, max_size=4)}
) | st.fixed_dictionaries({"version": JSON})
ANY_JSON = JSON | NEAR_REPLY


def ep(kind: str = "ollama") -> EndpointInfo:
    return EndpointInfo(
        id=1, name="probe", url="http://probe.test", kind=kind, api_key="k", enabled=True, limit=1
    )


def check_model_list(result: probes.ModelList) -> None:
    assert len(result.entries) == len(result.names)
    assert all(isinstance(n, str) for n in result.names)
    assert result.keys == frozenset(model_key(n) for n in result.names)
    for name in result.names:
        assert result.backend_name(model_key(name)) is not None


@given(ANY_JSON)
def test_any_json_gives_a_model_list_or_a_probe_error(data: Any) -> None:
    for list_key, name_keys in (("models", ("name", "model")), ("data", ("id",))):
        try:
            result = probes._model_list(data, list_key, name_keys)
        except probes.ProbeError as exc:
            assert str(exc)
        else:
            check_model_list(result)


@pytest.fixture
def answer() -> Iterator[Callable[[Callable[[httpx.Request], httpx.Response]], None]]:
    """Install a handler that answers every probe request in-process."""

    def install(handler: Callable[[httpx.Request], httpx.Response]) -> None:
        upstream_client.set_transport_factory(lambda: httpx.MockTransport(handler))

    yield install
    upstream_client.set_transport_factory(None)


async def _probe_all(kind: str) -> list[object]:
    results: list[object] = []
    try:
        for fetch in (probes.fetch_advertised, probes.fetch_loaded, probes.fetch_version):
            try:
                results.append(await fetch(ep(kind)))
            except probes.ProbeError as exc:
                results.append(exc)
    finally:
        await upstream_client.close_client()
    return results


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=st.sampled_from([200, 200, 200, 204, 301, 404, 500, 503]),
    body=st.binary(max_size=200) | ANY_JSON.map(lambda d: json.dumps(d).encode()),
    kind=st.sampled_from(["ollama", "openai"]),
)
def test_any_reply_gives_a_value_or_a_probe_error(
    answer: Callable[[Callable[[httpx.Request], httpx.Response]], None], status: int, body: bytes, kind: str
) -> None:
    answer(lambda request: httpx.Response(status, content=body))
    for result in asyncio.run(_probe_all(kind)):
        if isinstance(result, probes.ProbeError):
            assert str(result)
        elif isinstance(result, probes.ModelList):
            check_model_list(result)
        else:
            assert isinstance(result, str)  # a version


def test_a_good_reply_is_read_and_the_key_is_sent(answer: Callable[..., None]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/tags":
            return httpx.Response(
                200, json={"models": [{"name": "llama3"}, {"model": "qwen:7b"}, {"x": 1}, 5]}
            )
        if request.url.path == "/api/ps":
            return httpx.Response(200, json={"models": [{"name": "llama3:latest"}]})
        return httpx.Response(200, json={"version": "0.12.3"})

    answer(handler)
    advertised, loaded, version = asyncio.run(_probe_all("ollama"))
    assert isinstance(advertised, probes.ModelList) and advertised.names == ("llama3", "qwen:7b")
    assert advertised.keys == {"llama3:latest", "qwen:7b"}
    assert advertised.backend_name("llama3:latest") == "llama3"
    assert isinstance(loaded, probes.ModelList) and loaded.keys == {"llama3:latest"}
    assert version == "0.12.3"
    assert all(r.headers["authorization"] == "Bearer k" for r in seen)


def test_an_openai_server_has_no_loaded_list_and_answers_as_openai_compatible(
    answer: Callable[..., None],
) -> None:
    answer(lambda request: httpx.Response(200, json={"data": [{"id": "gpt-oss-20b"}]}))
    advertised, loaded, version = asyncio.run(_probe_all("openai"))
    assert isinstance(advertised, probes.ModelList) and advertised.keys == {"gpt-oss-20b:latest"}
    assert loaded is probes.EMPTY
    assert version == "openai-compatible"


def test_a_connection_closed_before_the_reply_is_retried_once(answer: Callable[..., None]) -> None:
    calls = 0

    def closes_first(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"version": "1"})

    answer(closes_first)
    assert asyncio.run(_version()) == "1" and calls == 2

    def always_closes(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    answer(always_closes)
    with pytest.raises(probes.ProbeError, match="closed the connection"):
        asyncio.run(_version())

    def refuses(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused")

    calls = 0
    answer(refuses)
    with pytest.raises(probes.ProbeError, match="connection refused"):
        asyncio.run(_version())
    assert calls == 1  # a refused connect is not retried


async def _version() -> str:
    try:
        return await probes.fetch_version(ep())
    finally:
        await upstream_client.close_client()
