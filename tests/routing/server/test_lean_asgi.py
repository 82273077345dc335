"""Route labels of the lean handler (routing/server/lean_asgi.py): derived from the route table it
serves, so every route (the statistics routes, /health and /metrics included) is its own label and
any other path is "other"."""

from __future__ import annotations

from django.urls import get_resolver
from hypothesis import given
from hypothesis import strategies as st

from routing.observability import metrics
from routing.server import lean_asgi

URLCONF = "nomyo_site.proxy_urls"
HANDLER = lean_asgi.ProxyHandler(URLCONF)
PATTERNS = {"/" + str(p.pattern) for p in get_resolver(URLCONF).url_patterns}
TABLE = {p for p in PATTERNS if "<" not in p}


def test_every_path_of_the_route_table_is_its_own_label() -> None:
    assert {"/api/chat", "/v1/models", "/health", "/metrics", "/api/usage", "/api/stats.csv"} <= TABLE
    assert {"/v1/rerank", "/rerank", "/api/ps_details"} <= TABLE
    assert {"/v1/messages", "/v1/messages/count_tokens"} <= TABLE
    # 25 client API routes (19 + /api/me, /api/ps_details, 2 rerank, 2 Anthropic) + 7 statistics
    assert len(TABLE) == 32
    assert PATTERNS - TABLE == {"/v1/models/<path:model_id>"}  # the one prefix route
    assert set(HANDLER.views) == TABLE
    for path in TABLE:
        assert lean_asgi._route_label(path) == path


@given(st.text(max_size=60).map(lambda s: "/" + s))
def test_any_other_path_is_other(path: str) -> None:
    if path not in TABLE and not (path.startswith("/v1/models/") and path != "/v1/models/"):
        assert lean_asgi._route_label(path) == "other"


@given(st.text(min_size=1, max_size=60))
def test_every_path_under_a_prefix_route_has_the_routes_one_label(model_id: str) -> None:
    assert lean_asgi._route_label("/v1/models/" + model_id) == "/v1/models/{model_id}"
    assert lean_asgi._route_label("/v1/models/") == "other"


def test_a_prefix_route_is_found_by_its_prefix_and_only_that_shape_is_accepted() -> None:
    (route,) = HANDLER.prefixes
    assert (route.prefix, route.argument, route.label) == ("/v1/models/", "model_id", "/v1/models/{model_id}")
    assert lean_asgi._prefix_of("v1/models/<path:model_id>") == ("v1/models/", "model_id")
    for other in ["v1/<int:n>/x", "v1/models<path:x>", "v1/<str:a>/<path:b>", "v1/m/<path:x>/more"]:
        assert lean_asgi._prefix_of(other) is None


def test_a_finished_request_is_counted_under_its_route_label() -> None:
    scope = {"method": "GET", "path": "/api/usage"}
    HANDLER._account(scope, "/api/usage", None, 200, 0.0, "rid-1")
    HANDLER._account(scope, "/api/usage/../x", None, 404, 0.0, "rid-2")
    assert ("/api/usage", "", 200) in metrics._request_children
    assert ("other", "", 404) in metrics._request_children
    assert not any(key[0] == "/api/usage/../x" for key in metrics._request_children)


@given(
    st.integers(2, 5), st.sampled_from(["api/chat", "api/nope", "v1/models", "v1/chat/completions", "v1/x/y"])
)
def test_paths_under_the_apis_with_extra_leading_slashes_are_the_lean_handlers(
    slashes: int, rest: str
) -> None:
    path = "/" * slashes + rest
    assert lean_asgi.is_proxy_path(path)  # a JSON 404 in the protocol's shape, never Django's HTML
    assert lean_asgi._route_label(path) == "other"  # not normalised: no route answers it


def test_other_double_slash_paths_stay_djangos() -> None:
    for path in ["//admin/", "//", "//dashboard/", "//apix", "//v1x", "//health"]:
        assert not lean_asgi.is_proxy_path(path), path


def test_a_stream_that_fails_after_its_headers_ends_with_an_error_line_and_is_closed() -> None:
    import asyncio
    import json

    from django.http import StreamingHttpResponse

    async def lines():
        yield b'{"status":"pulling"}\n'
        raise RuntimeError("a bug in the middle of a stream")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    response = StreamingHttpResponse(lines(), content_type="application/x-ndjson")
    asyncio.run(HANDLER._send(send, response, "r1"))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert [m["body"] for m in sent[1:]] == [b'{"status":"pulling"}\n', lean_asgi.STREAM_FAILED]
    assert sent[-1]["more_body"] is False  # the reply is finished: the connection is not left open
    assert "error" in json.loads(lean_asgi.STREAM_FAILED)


def test_what_send_raises_during_a_stream_is_not_taken_for_the_streams_failure() -> None:
    import asyncio

    import pytest
    from django.http import StreamingHttpResponse

    class Stop(Exception):  # as the HEAD front ends a reply after its head (routing/server/front.py)
        pass

    async def lines():
        yield b"a\n"
        yield b"b\n"

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            raise Stop()

    response = StreamingHttpResponse(lines(), content_type="application/x-ndjson")
    with pytest.raises(Stop):
        asyncio.run(HANDLER._send(send, response, "r2"))
    assert [m.get("body") for m in sent[1:]] == [b"a\n"]  # no error line was added
