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
TABLE = {"/" + str(p.pattern) for p in get_resolver(URLCONF).url_patterns}


def test_every_path_of_the_route_table_is_its_own_label() -> None:
    assert {"/api/chat", "/v1/models", "/health", "/metrics", "/api/usage", "/api/stats.csv"} <= TABLE
    assert len(TABLE) == 27  # 20 client API routes (19 + /api/me) + 7 statistics routes
    assert set(HANDLER.views) == TABLE
    for path in TABLE:
        assert lean_asgi._route_label(path) == path


@given(st.text(max_size=60).map(lambda s: "/" + s))
def test_any_other_path_is_other(path: str) -> None:
    if path not in TABLE:
        assert lean_asgi._route_label(path) == "other"


def test_a_finished_request_is_counted_under_its_route_label() -> None:
    scope = {"method": "GET", "path": "/api/usage"}
    HANDLER._account(scope, "/api/usage", None, 200, 0.0, "rid-1")
    HANDLER._account(scope, "/api/usage/../x", None, 404, 0.0, "rid-2")
    assert ("/api/usage", "", 200) in metrics._request_children
    assert ("other", "", 404) in metrics._request_children
    assert not any(key[0] == "/api/usage/../x" for key in metrics._request_children)
