"""The corners clients probe first, over real sockets against the daphne router process:
the base URL, HEAD, the discovery routes for any mix of servers, and CORS for browser apps."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from nomyo_site import proxy_urls

SECRET = "s3cret"
EXTRA_ORIGINS = "https://app.example.com, https://*.corp.example"
# Headers that differ between two replies to the same request (times, ids, cookies), or frame
# the body (a stream answering HEAD has none to frame).
PER_REPLY = {"date", "expires", "x-request-id", "content-length", "set-cookie", "transfer-encoding"}


def proxy_routes() -> list[str]:
    return ["/" + str(p.pattern) for p in proxy_urls.urlpatterns]


def cors_of(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


# -- the base URL ------------------------------------------------------------------------
def test_the_base_url_answers_api_clients_as_ollama_and_sends_browsers_to_the_page(router) -> None:
    server = router(ROUTER_API_KEY=SECRET)  # `/` stays open, as Ollama's is
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for accept in (None, "*/*", "application/json", "text/plain"):
            headers = {"Accept": accept} if accept else {}
            got = http.get("/", headers=headers)
            assert (got.status_code, got.text) == (200, "Ollama is running"), accept
            assert got.headers["content-type"] == "text/plain; charset=utf-8"
            head = http.head("/", headers=headers)
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == "17" == got.headers["content-length"]
        # A browser's navigation: to the page (and from there to the login form).
        page = http.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert page.status_code == 302 and page.headers["location"] == "/dashboard/"
        assert http.get("/dashboard/").headers["location"].startswith("/admin/login/")
        wrong = http.post("/", content=b"{}")
        assert wrong.status_code == 405 and set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}
        assert "error" in wrong.json()
    # The official client's own probe of a server.
    assert httpx.get(server.url, timeout=5).text == "Ollama is running"


# -- HEAD ---------------------------------------------------------------------------------
def test_head_answers_wherever_get_does_with_the_same_status_and_headers(router, fakes, endpoint) -> None:
    gpu = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], version="0.11.4")
    endpoint(gpu.url, name="gpu-1")
    server = router()
    stable = {"/api/version", "/api/tags", "/api/ps", "/v1/models", "/health", "/dashboard/", "/admin/login/"}
    get_routes: list[str] = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for path in [*proxy_routes(), "/dashboard/", "/admin/login/", "/favicon.ico"]:
            if path == "/api/usage-stream":
                continue  # never ends under GET: below
            got = http.get(path)
            if got.status_code == 405:
                assert "HEAD" not in got.headers["allow"], path
                assert http.head(path).status_code == 405, path
                continue
            get_routes.append(path)
            head = http.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
            assert head.content == b"", path
            same = {k: v for k, v in head.headers.items() if k not in PER_REPLY}
            assert same == {k: v for k, v in got.headers.items() if k not in PER_REPLY}, path
            # A whole reply's length is announced as GET's would be; a streamed one has none.
            assert ("content-length" in head.headers) == ("content-length" in got.headers), path
            if path in stable:
                assert (
                    head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
                )
        # Every discovery route of the issue is among them.
        assert {"/api/version", "/api/tags", "/api/ps", "/v1/models", "/health", "/metrics"} <= set(
            get_routes
        )
        # A stream answers HEAD with its headers and ends.
        head = http.head("/api/usage-stream", timeout=5)
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        # The router still works after it (the stream's task did not take the process down).
        assert http.get("/api/version").json() == {"version": "0.11.4"}
    assert "Traceback" not in server.log()


# -- discovery with any mix of servers ------------------------------------------------------
def test_discovery_routes_answer_for_no_server_only_openai_and_only_ollama(router, fakes, endpoint) -> None:
    from routing.models import Endpoint
    from tests.conftest import wait_until

    server = router(ROUTER_ORIGINS="https://app.example.com")
    origin = {"Origin": "https://app.example.com"}

    def discovery(http: httpx.Client) -> dict[str, Any]:
        replies = {
            p: http.get(p, headers=origin) for p in ("/api/version", "/api/tags", "/api/ps", "/v1/models")
        }
        for path, reply in replies.items():
            assert reply.status_code == 200, (path, reply.text)
            assert reply.headers["access-control-allow-origin"] == "https://app.example.com"
        return {p: r.json() for p, r in replies.items()}

    with httpx.Client(base_url=server.url, timeout=10) as http:
        none = discovery(http)
        assert none["/api/version"]["version"]  # the facade's version: clients' "test connection" passes
        assert none["/api/tags"] == {"models": []} and none["/api/ps"] == {"models": []}
        assert none["/v1/models"] == {"object": "list", "data": []}
        # A 503 from the router carries the CORS headers too.
        pull = http.post("/api/pull", json={"model": "llama3"}, headers=origin)
        assert pull.status_code == 503 and pull.headers["access-control-allow-origin"] == origin["Origin"]

        cpp = fakes(kind="openai", models=["qwen2.5-coder:32b"])
        endpoint(cpp.url + "/v1", name="cpp", kind="openai")
        wait_until(lambda: bool(http.get("/v1/models").json()["data"]))
        only_openai = discovery(http)
        assert only_openai["/api/version"] == none["/api/version"]
        assert [m["name"] for m in only_openai["/api/tags"]["models"]] == ["qwen2.5-coder:32b"]
        assert [m["id"] for m in only_openai["/v1/models"]["data"]] == ["qwen2.5-coder:32b"]

        Endpoint.objects.filter(name="cpp").delete()
        gpu = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], version="0.11.4")
        endpoint(gpu.url, name="gpu")
        wait_until(lambda: http.get("/api/version").json() == {"version": "0.11.4"})
        only_ollama = discovery(http)
        assert [m["name"] for m in only_ollama["/api/ps"]["models"]] == ["llama3:latest"]
        assert [m["id"] for m in only_ollama["/v1/models"]["data"]] == ["llama3:latest"]


# -- CORS ---------------------------------------------------------------------------------
@pytest.fixture
def cors_router(router, fakes, endpoint) -> Any:
    gpu = fakes(kind="ollama", models=["llama3:latest"], tokens=5)
    cpp = fakes(kind="openai", models=["qwen:7b"], tokens=5)
    endpoint(gpu.url, name="gpu-1")
    endpoint(cpp.url + "/v1", name="cpp-1", kind="openai")
    return router(ROUTER_API_KEY=SECRET, ROUTER_ORIGINS=EXTRA_ORIGINS, ROUTER_MAX_BODY="4096")


def preflight(http: httpx.Client, path: str, origin: str, headers: str | None = None) -> httpx.Response:
    asked = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if headers is not None:
        asked["Access-Control-Request-Headers"] = headers
    return http.options(path, headers=asked)


def test_preflights_are_answered_before_the_api_key_check(cors_router) -> None:
    with httpx.Client(base_url=cors_router.url, timeout=10) as http:
        for path in ("/v1/chat/completions", "/api/chat", "/api/tags", "/", "/v1/no-such-route"):
            for origin in ("http://localhost:5173", "https://app.example.com", "app://obsidian.md"):
                got = preflight(http, path, origin, "authorization, content-type, x-stainless-os")
                assert got.status_code == 204, (path, origin, got.text)
                assert got.content == b""
                assert got.headers["access-control-allow-origin"] == origin
                assert "POST" in got.headers["access-control-allow-methods"]
                assert (
                    got.headers["access-control-allow-headers"]
                    == "authorization, content-type, x-stainless-os"
                )
                assert int(got.headers["access-control-max-age"]) > 0
                assert "Origin" in got.headers["vary"]
        # Chromium's Private Network Access asks one more question of a preflight.
        asked = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
        private = http.options(
            "/api/chat", headers={**asked, "Access-Control-Request-Private-Network": "true"}
        )
        assert (
            private.status_code == 204 and private.headers["access-control-allow-private-network"] == "true"
        )
        assert "access-control-allow-private-network" not in http.options("/api/chat", headers=asked).headers
        # No requested headers, or a list that is not one: the default list, with authorization.
        for listed in (None, "x-a; x-b=(1)"):
            got = preflight(http, "/api/chat", "http://127.0.0.1:3000", listed)
            assert got.status_code == 204
            assert "authorization" in got.headers["access-control-allow-headers"].lower()


def test_disallowed_origins_get_403_and_no_cors_headers(cors_router) -> None:
    auth = {"Authorization": f"Bearer {SECRET}"}
    with httpx.Client(base_url=cors_router.url, timeout=10) as http:
        for origin in (
            "https://evil.example",
            "http://localhost.evil.example",
            "https://corp.example",  # the pattern wants a subdomain
            "chrome-extension://abcdef",  # not in Ollama's defaults either
            "null",
        ):
            got = preflight(http, "/v1/chat/completions", origin, "authorization")
            assert got.status_code == 403 and cors_of(got) == {}, origin
            assert got.json()["error"]["type"] == "permission_error"
            # Not only preflights: a simple request (a form POST needs none) is refused too.
            simple = http.post(
                "/api/generate", json={"model": "llama3", "prompt": "hi"}, headers={**auth, "Origin": origin}
            )
            assert simple.status_code == 403 and cors_of(simple) == {}, origin
            assert "ROUTER_ORIGINS" in simple.json()["error"]
        head = http.head("/api/version", headers={**auth, "Origin": "https://evil.example"})
        assert head.status_code == 403 and head.content == b"" and cors_of(head) == {}
        assert cors_router.log().count("not allowed (ROUTER_ORIGINS)") == 11


def test_every_reply_to_an_allowed_origin_carries_cors_headers(cors_router) -> None:
    origin = "https://team.corp.example"
    auth = {"Authorization": f"Bearer {SECRET}", "Origin": origin}

    def check(reply: httpx.Response, status: int) -> None:
        assert reply.status_code == status, reply.text
        assert reply.headers["access-control-allow-origin"] == origin
        exposed = {h.strip().lower() for h in reply.headers["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "x-router-endpoint", "x-router-ignored", "retry-after"} <= exposed
        assert "Origin" in reply.headers["vary"]

    with httpx.Client(base_url=cors_router.url, timeout=10) as http:
        check(http.get("/api/tags", headers=auth), 200)
        check(http.get("/", headers={"Origin": origin}), 200)
        check(http.head("/api/version", headers=auth), 200)
        # Errors: no key, wrong key, unknown route, wrong method, bad body, body too large.
        check(http.get("/api/tags", headers={"Origin": origin}), 401)
        check(http.get("/api/tags", headers={"Origin": origin, "Authorization": "Bearer nope"}), 401)
        check(http.get("/api/nope", headers=auth), 404)
        check(http.get("/api/chat", headers=auth), 405)
        check(http.post("/api/chat", content=b"{", headers=auth), 400)
        check(http.post("/api/chat", content=b"x" * 5000, headers=auth), 413)
        # Whole and streamed replies on both APIs.
        hello = [{"role": "user", "content": "hi"}]
        whole = http.post(
            "/api/chat", json={"model": "llama3", "messages": hello, "stream": False}, headers=auth
        )
        check(whole, 200)
        assert whole.headers["x-router-endpoint"] == "gpu-1" and whole.json()["done"] is True
        with http.stream(
            "POST", "/api/chat", json={"model": "llama3", "messages": hello}, headers=auth
        ) as stream:
            check(stream, 200)
            lines = [json.loads(line) for line in stream.iter_lines() if line.strip()]
        assert lines[-1]["done"] is True and len(lines) == 6
        body = {"model": "qwen:7b", "messages": hello, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as stream:
            check(stream, 200)
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
    # Without an Origin header nothing changes: no CORS headers at all.
    plain = httpx.get(cors_router.url + "/api/tags", headers={"Authorization": f"Bearer {SECRET}"})
    assert plain.status_code == 200 and cors_of(plain) == {}


def test_same_origin_requests_and_pages(cors_router) -> None:
    with httpx.Client(base_url=cors_router.url, timeout=10) as http:
        # A page served from the router's own host name (not in any list) may call it.
        mine = http.get(
            "/api/version",
            headers={
                "Origin": "http://router.internal:8080",
                "Host": "router.internal:8080",
                "Authorization": f"Bearer {SECRET}",
            },
        )
        assert (
            mine.status_code == 200
            and mine.headers["access-control-allow-origin"] == "http://router.internal:8080"
        )
        # Django's pages are same-origin only: no CORS headers, whatever the origin.
        page = http.get("/admin/login/", headers={"Origin": "http://localhost:5173"})
        assert page.status_code == 200 and cors_of(page) == {}
        icon = http.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] in (
            "image/x-icon",
            "image/vnd.microsoft.icon",
        )
        assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO header


def test_the_facade_under_uvicorn(fakes, endpoint, transactional_db, tmp_path) -> None:
    from tests.conftest import start_router

    gpu = fakes(kind="ollama", models=["llama3:latest"], tokens=3)
    endpoint(gpu.url, name="gpu-1")
    server = start_router(tmp_path, server="uvicorn", ROUTER_API_KEY=SECRET)
    origin = "http://localhost:3000"
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/").text == "Ollama is running"
            head = http.head("/api/tags", headers={"Authorization": f"Bearer {SECRET}"})
            got = http.get("/api/tags", headers={"Authorization": f"Bearer {SECRET}"})
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
            assert (
                http.head("/api/usage-stream", headers={"Authorization": f"Bearer {SECRET}"}).status_code
                == 200
            )
            assert preflight(http, "/api/chat", origin, "authorization").status_code == 204
            hello = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
            auth = {"Authorization": f"Bearer {SECRET}", "Origin": origin}
            with http.stream("POST", "/api/chat", json=hello, headers=auth) as stream:
                assert stream.headers["access-control-allow-origin"] == origin
                assert json.loads(list(stream.iter_lines())[-1])["done"] is True
            assert (
                http.get("/api/tags", headers={"Origin": origin}).headers["access-control-allow-origin"]
                == origin
            )
    finally:
        server.stop()
    assert "Traceback" not in server.log()
