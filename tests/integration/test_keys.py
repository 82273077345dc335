"""Client keys through a real router over real sockets (issue 14): every status in each
protocol's shape, each limit, /api/me, usage rows by client, revocation, and fair queueing
between keys."""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
from typing import Any

import httpx
import pytest
from django.core.management import call_command

from routing.models import ClientKey
from stats.models import TokenTotal
from tests.conftest import clear_of_minute_edge, wait_until
from tests.integration.test_cluster import _redis_answers

OPERATOR = "op-secret"
OP = {"Authorization": f"Bearer {OPERATOR}"}
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}], "stream": False}
OPENAI_CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}]}


def make_key(name: str, *options: str) -> str:
    out = io.StringIO()
    call_command("client_key_create", name, *options, stdout=out)
    return out.getvalue().rstrip("\n").splitlines()[-1]


def own_redis_db() -> str:
    """The URL of a Redis database of its own (8-14, away from the unit tests' 6 and 15), emptied
    first: quota counters are kept by key id, and a test database gives the same ids out again,
    so an earlier test's counts of this minute would be this test's."""
    import redis

    url = f"redis://127.0.0.1:6379/{8 + uuid.uuid4().int % 7}"
    redis.Redis.from_url(url).flushdb()
    return url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", headers=OP, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def served(fakes, endpoint, router) -> Any:
    fake = fakes(kind="ollama", models=["llama3:latest", "qwen2:7b"], tokens=4)
    endpoint(fake.url, max_concurrent_connections=4)
    return fake


def test_each_status_in_each_protocols_shape(served, router):
    key = make_key("team", "--models", "llama3*")
    disabled = make_key("gone")
    ClientKey.objects.filter(name="gone").update(enabled=False)
    expired = make_key("old", "--expires", "2020-01-01")
    server = router(ROUTER_API_KEY=OPERATOR)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        cases = [
            ({}, 401, "missing key"),
            (bearer("nr-not-a-key"), 401, "unknown key"),
            ({"Authorization": "Basic xyz"}, 401, "Authorization must be 'Bearer <key>', not the 'Basic'"),
            ({"Authorization": key}, 401, "Authorization must be 'Bearer <key>'"),  # the key alone
            ({"Authorization": "Bearer"}, 401, "Bearer without a key"),
            (bearer(disabled), 403, "disabled"),
            (bearer(expired), 403, "expired"),
        ]
        for headers, status, words in cases:
            ollama = http.post("/api/chat", json=CHAT, headers=headers)
            assert ollama.status_code == status and words in ollama.json()["error"], ollama.text
            assert key not in ollama.text  # a header in the wrong shape is not echoed
            openai = http.post("/v1/chat/completions", json=OPENAI_CHAT, headers=headers)
            assert openai.status_code == status, openai.text
            error = openai.json()["error"]
            assert words in error["message"]
            assert error["type"] == ("authentication_error" if status == 401 else "permission_error")
        # a model the key may not use: 403, in both shapes; an allowed one passes, by either header
        other = {**CHAT, "model": "qwen2:7b"}
        refused = http.post("/api/chat", json=other, headers=bearer(key))
        assert refused.status_code == 403 and "may not use the model" in refused.json()["error"]
        refused_v1 = http.post(
            "/v1/chat/completions", json={**OPENAI_CHAT, "model": "qwen2:7b"}, headers=bearer(key)
        )
        assert refused_v1.status_code == 403 and refused_v1.json()["error"]["code"] == "model_not_allowed"
        assert http.post("/api/chat", json=CHAT, headers=bearer(key)).status_code == 200
        assert http.post("/api/chat", json=CHAT, headers={"x-api-key": key}).status_code == 200
        # the operator key: no limits, every model
        assert http.post("/api/chat", json=other, headers=OP).status_code == 200
        # /health stays open
        assert http.get("/health").status_code == 200


def test_requests_per_minute_429_with_retry_after_and_ratelimit_headers(served, router):
    key = make_key("rpm2", "--rpm", "2")
    server = router(ROUTER_API_KEY=OPERATOR)
    clear_of_minute_edge()
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(key)) as http:
        first = http.post("/v1/chat/completions", json=OPENAI_CHAT)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert re.fullmatch(r"\d+s|\d+m\d+s", first.headers["x-ratelimit-reset-requests"])
        assert http.post("/api/chat", json=CHAT).status_code == 200
        assert "x-ratelimit-limit-requests" not in http.post("/api/chat", json=CHAT).headers  # a 429 on /api
        over = http.post("/v1/chat/completions", json=OPENAI_CHAT)
        assert over.status_code == 429
        assert 1 <= int(over.headers["retry-after"]) <= 60
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        assert over.headers["x-ratelimit-remaining-requests"] == "0"
        ollama = http.post("/api/chat", json=CHAT)
        assert ollama.status_code == 429 and "2 requests per minute" in ollama.json()["error"]
    assert metric(server.url, "router_client_rate_limited_total", client="rpm2", limit="rpm") == 3


def test_concurrency_limit_and_its_release(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=30, delay=0.05)
    endpoint(fake.url, max_concurrent_connections=4)
    key = make_key("one-at-a-time", "--concurrency", "1")
    server = router(ROUTER_API_KEY=OPERATOR)
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(key)) as http:
        with http.stream("POST", "/api/chat", json={**CHAT, "stream": True}) as held:
            assert held.status_code == 200
            second = http.post("/api/chat", json=CHAT)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert "in flight" in second.json()["error"]
            me = http.get("/api/me")  # outside the limits: a key at its limit can read its usage
            assert me.status_code == 200 and me.json()["usage"]["concurrent_requests"] == 1
            held.read()
        # released at the end of the stream (and of a refused or failed request)
        assert http.post("/api/chat", json=CHAT).status_code == 200
        # a client that goes away mid-stream gives its place back too
        with http.stream("POST", "/api/chat", json={**CHAT, "stream": True}) as cut:
            next(cut.iter_bytes())
        wait_until(lambda: http.post("/api/chat", json=CHAT).status_code == 200, timeout=10)


def test_token_limits_are_charged_with_real_usage(served, router):
    limits = ("--daily-tokens", "4", "--tpm", "1000", "--monthly-tokens", "1000")
    key = make_key("small", *limits, "--expires", "2099-01-02T03:04")
    server = router()
    clear_of_minute_edge()
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(key)) as http:
        assert http.post("/api/chat", json=CHAT).status_code == 200  # 4 completion + prompt tokens
        wait_until(lambda: http.get("/api/me").json()["usage"]["tokens_today"] > 0)
        used = http.get("/api/me").json()
        assert used["name"] == "small" and used["kind"] == "key" and used["priority"] == "normal"
        assert used["enabled"] is True and used["expires"] == "2099-01-02T03:04:00Z"
        assert used["limits"] == {
            "rpm": None,
            "tpm": 1000,
            "concurrency": None,
            "daily_tokens": 4,
            "monthly_tokens": 1000,
        }
        tokens = used["usage"]["tokens_today"]
        assert tokens == used["usage"]["tokens_this_month"] == used["usage"]["tokens_this_minute"] >= 5
        assert used["usage"]["concurrent_requests"] == 0 and used["usage"]["requests_this_minute"] == 1
        over = http.post("/v1/chat/completions", json=OPENAI_CHAT)
        assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota"
        assert "4 tokens per day" in over.json()["error"]["message"]
        assert int(over.headers["retry-after"]) >= 1
        assert over.headers["x-ratelimit-remaining-tokens"] == str(1000 - tokens)


def test_usage_is_recorded_by_client(served, router):
    key = make_key("team-a")
    server = router(ROUTER_API_KEY=OPERATOR)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for headers in (bearer(key), bearer(key), OP):
            assert http.post("/api/chat", json=CHAT, headers=headers).status_code == 200

    def rows() -> dict[str, int]:
        return {r.client: r.requests for r in TokenTotal.objects.all()}

    wait_until(lambda: rows() == {"team-a": 2, "operator": 1}, timeout=15)
    assert metric(server.url, "router_client_requests_total", client="team-a", status="200") == 2
    assert metric(server.url, "router_client_tokens_total", client="team-a", direction="output") == 8
    wait_until(lambda: ClientKey.objects.get(name="team-a").last_used is not None, timeout=40)


def test_a_key_reads_its_own_usage_and_never_the_fleet_or_another_clients(served, router):
    key = make_key("team-a")
    make_key("team-b")
    server = router(ROUTER_API_KEY=OPERATOR)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for headers in (bearer(key), OP, OP):
            assert http.post("/api/chat", json=CHAT, headers=headers).status_code == 200
        wait_until(lambda: {r.client for r in TokenTotal.objects.all()} == {"team-a", "operator"}, timeout=15)
        for method, path in [
            ("GET", "/api/usage"),
            ("GET", "/api/token_counts"),
            ("GET", "/api/config"),
            ("GET", "/api/usage-stream"),
            ("POST", "/api/aggregate_time_series_days"),
            ("GET", "/metrics"),
        ]:
            refused = http.request(method, path, headers=bearer(key))
            assert refused.status_code == 403, path
            assert "operator key" in refused.json()["error"], path  # Ollama's shape on these routes
            if path != "/api/usage-stream":  # a stream that never ends
                assert http.request(method, path, headers=OP).status_code == 200, path
        own = http.post("/api/stats", json={"model": "llama3"}, headers=bearer(key)).json()
        everyone = http.post("/api/stats", json={"model": "llama3"}, headers=OP).json()
        assert own["client"] == "team-a" and own["requests"] == 1 and everyone["requests"] == 3
        other = http.post("/api/stats", json={"model": "llama3", "client": "operator"}, headers=bearer(key))
        assert other.status_code == 403 and "operator" in other.json()["error"]
        assert http.get("/api/stats.csv?client=team-b", headers=bearer(key)).status_code == 403
        rows = http.get("/api/stats.csv", headers=bearer(key)).text.splitlines()
        client = rows[0].split(",").index("client")
        assert len(rows) > 1 and {row.split(",")[client] for row in rows[1:]} == {"team-a"}
        assert http.get("/api/me", headers=bearer(key)).json()["name"] == "team-a"


def test_without_any_key_the_router_stays_open(served, router):
    server = router()
    reply = httpx.post(server.url + "/api/chat", json=CHAT, headers=bearer("sk-anything"), timeout=30)
    assert reply.status_code == 200
    me = httpx.get(server.url + "/api/me", timeout=5).json()
    assert me["name"] == "anonymous" and me["limits"]["rpm"] is None
    assert me["enabled"] is True and me["expires"] is None


def test_a_revoked_key_is_refused_without_a_restart(served, router):
    key = make_key("leaving")
    server = router()
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(key)) as http:
        assert http.post("/api/chat", json=CHAT).status_code == 200
        call_command("client_key_revoke", "leaving", stdout=io.StringIO())
        # no Redis here: the router's copy is at most ROUTER_REGISTRY_RELOAD (0.2 s in tests) old
        wait_until(lambda: http.post("/api/chat", json=CHAT).status_code == 403, timeout=5)


def test_fair_queueing_one_request_of_another_key_is_served_at_the_next_free_slot(fakes, endpoint, router):
    """The headline: key A floods 50 requests on a one-slot model, key B sends one. B is served as
    soon as the slot frees, before A's 49 other queued requests.

    A's first request holds the slot for 2 s (the fake delays only a body with "hold in it"), so
    A's other 49 are all queued before B comes however slow the machine is; the rest answer at
    once, so the flood drains in moments."""
    fake = fakes(
        kind="ollama", models=["llama3:latest"], tokens=5, first_byte_delay=2.0, fault_match="hold in it"
    )
    endpoint(fake.url, max_concurrent_connections=1)
    flood, single = make_key("flood"), make_key("single")
    server = router(ROUTER_API_KEY=OPERATOR, ROUTER_QUEUE_TIMEOUT="120")
    finished: list[str] = []
    holding = {**CHAT, "messages": [{"role": "user", "content": "hold in it"}]}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

            async def one(key: str, who: str, body: dict[str, Any] = CHAT) -> None:
                reply = await http.post("/api/chat", json=body, headers=bearer(key))
                assert reply.status_code == 200
                finished.append(who)

            first = asyncio.create_task(one(flood, "A0", holding))
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(metric, server.url, "router_in_flight") < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            floods = [asyncio.create_task(one(flood, f"A{i}")) for i in range(1, 50)]
            while await asyncio.to_thread(metric, server.url, "router_queued") < 49:
                assert time.monotonic() < deadline and not first.done()
                await asyncio.sleep(0.05)
            await one(single, "B")
            await asyncio.gather(first, *floods)

    asyncio.run(run())
    assert len(finished) == 51
    assert finished.index("A0") == 0 and finished.index("B") == 1, finished[:5]


@pytest.mark.skipif(not _redis_answers(), reason="no Redis at 127.0.0.1:6379 (CI starts one)")
def test_two_router_processes_share_limits_and_see_a_revocation_on_the_next_request(served, router, settings):
    settings.REDIS_URL = own_redis_db()  # the commands here bump the key generation there
    shared = make_key("shared", "--rpm", "3")
    # Limits far away: both processes admit it from leases, with no round trip to Redis.
    leaving = make_key("leaving", "--rpm", "100000", "--concurrency", "1000", "--tpm", "100000000")
    # The safety-net reload is far away: only the Redis generation can make the change seen.
    env = {"REDIS_URL": settings.REDIS_URL, "ROUTER_API_KEY": OPERATOR, "ROUTER_REGISTRY_RELOAD": "120"}
    a, b = router(**env), router(**env)
    clear_of_minute_edge()
    with httpx.Client(timeout=30) as http:
        statuses = [
            http.post(url + "/api/chat", json=CHAT, headers=bearer(shared)).status_code
            for url in (a.url, b.url, a.url, b.url)
        ]
        assert statuses == [200, 200, 200, 429]  # 3 per minute across both processes
        for url in (a.url, b.url):
            deadline = time.monotonic() + 20
            while metric(url, "router_quota_admissions_total", path="lease") < 5:
                assert http.post(url + "/api/chat", json=CHAT, headers=bearer(leaving)).status_code == 200
                assert time.monotonic() < deadline, "no admission from a lease"
        call_command("client_key_revoke", "leaving", stdout=io.StringIO())
        for url in (a.url, b.url):  # at once, no waiting
            refused = http.post(url + "/v1/chat/completions", json=OPENAI_CHAT, headers=bearer(leaving))
            assert refused.status_code == 403 and "disabled" in refused.json()["error"]["message"]
        # a changed limit too: the next request anywhere sees it
        ClientKey.objects.filter(name="shared").update(rpm=10)
        from routing.fleet import control

        control.keys_changed()
        assert http.post(b.url + "/api/chat", json=CHAT, headers=bearer(shared)).status_code == 200


@pytest.mark.skipif(not _redis_answers(), reason="no Redis at 127.0.0.1:6379 (CI starts one)")
def test_with_redis_one_client_in_sequence_passes_a_token_limit_by_one_request_only(served, router, settings):
    """Requests one after another, no pause: the router's own charges count before they are
    written to Redis, so, as without Redis, the request that crosses the tpm completes and the
    next is refused."""
    settings.REDIS_URL = own_redis_db()
    key = make_key("sequential", "--tpm", "30")
    server = router(REDIS_URL=settings.REDIS_URL, ROUTER_API_KEY=OPERATOR)
    clear_of_minute_edge()
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(key)) as http:
        statuses = [http.post("/api/chat", json=CHAT).status_code for _ in range(12)]
        assert 429 in statuses, statuses
        admitted = statuses.index(429)
        assert statuses == [200] * admitted + [429] * (12 - admitted)
        wait_until(lambda: http.get("/api/me").json()["usage"]["tokens_this_minute"] > 0)
        tokens = http.get("/api/me").json()["usage"]["tokens_this_minute"]
    each = tokens // admitted  # every request the same size
    assert tokens == each * admitted
    assert (admitted - 1) * each < 30 <= tokens, (admitted, each)  # the last admitted crossed it


@pytest.fixture
def fleet(fakes, endpoint) -> Any:
    """One Ollama server with three models, two of them loaded."""
    fake = fakes(
        kind="ollama",
        models=["llama3:latest", "llama3.1:8b", "qwen2:7b"],
        loaded=["llama3:latest", "qwen2:7b"],
        tokens=4,
    )
    endpoint(fake.url, max_concurrent_connections=4)
    return fake


def listed(http: httpx.Client, headers: dict[str, str]) -> dict[str, set[str]]:
    """The model names each list route shows to a caller with `headers`."""
    tags = http.get("/api/tags", headers=headers)
    ps = http.get("/api/ps", headers=headers)
    v1 = http.get("/v1/models", headers=headers)
    assert tags.status_code == ps.status_code == v1.status_code == 200, (tags.text, ps.text, v1.text)
    return {
        "tags": {m["name"] for m in tags.json()["models"]},
        "ps": {m["name"] for m in ps.json()["models"]},
        "v1": {m["id"] for m in v1.json()["data"]},
    }


def ps_details(http: httpx.Client, headers: dict[str, str]) -> set[str]:
    reply = http.get("/api/ps_details", headers=headers)
    assert reply.status_code == 200, reply.text
    return {m["name"] for m in reply.json()["models"]}


def test_the_lists_show_a_key_only_the_models_it_may_use(fakes, endpoint, fleet, router):
    llama_cpp = fakes(kind="openai", models=["qwen-coder"])
    endpoint(llama_cpp.url + "/v1", name="llama-cpp", kind="openai")
    key = make_key("llamas", "--models", "llama3*")
    server = router(ROUTER_API_KEY=OPERATOR)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # /api/ps_details once listed every loaded model, and its server, to any key
        assert ps_details(http, bearer(key)) == {"llama3:latest"}
        assert ps_details(http, OP) == {"llama3:latest", "qwen2:7b", "qwen-coder"}
        http.get("/api/tags", headers=OP)  # the lists below know the OpenAI-compatible server too
        assert listed(http, bearer(key)) == {
            "tags": {"llama3:latest", "llama3.1:8b"},
            "ps": {"llama3:latest"},
            "v1": {"llama3:latest", "llama3.1:8b"},
        }
        everything = {"llama3:latest", "llama3.1:8b", "qwen2:7b"}
        listed_all = listed(http, OP)
        assert listed_all["ps"] == {"llama3:latest", "qwen2:7b"}
        assert listed_all["tags"] == listed_all["v1"] == {*everything, "qwen-coder"}
        # one model: a model the key may not use is as absent as one nobody has
        assert http.get("/v1/models/llama3.1:8b", headers=bearer(key)).json()["id"] == "llama3.1:8b"
        hidden = http.get("/v1/models/qwen2:7b", headers=bearer(key))
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
        assert http.get("/v1/models/qwen2:7b", headers=OP).status_code == 200
        # /api/show of a model the key may not use: 403 in Ollama's shape
        refused = http.post("/api/show", json={"model": "qwen2:7b"}, headers=bearer(key))
        assert refused.status_code == 403 and "may not use the model 'qwen2:7b'" in refused.json()["error"]
        assert http.post("/api/show", json={"model": "llama3"}, headers=bearer(key)).status_code == 200


MANAGEMENT = [
    ("POST", "/api/pull", {"model": "phi3", "stream": False}),
    ("POST", "/api/push", {"model": "llama3", "stream": False}),
    ("POST", "/api/create", {"model": "mine", "from": "llama3", "stream": False}),
    ("POST", "/api/copy", {"source": "llama3", "destination": "llama3-copy"}),
    ("DELETE", "/api/delete", {"model": "qwen2:7b"}),
]


def test_fleet_management_is_the_operators_alone(fleet, router):
    key = make_key("team")
    server = router(ROUTER_API_KEY=OPERATOR)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for method, path, body in MANAGEMENT:
            refused = http.request(method, path, json=body, headers=bearer(key))
            assert refused.status_code == 403, (path, refused.text)
            why = refused.json()["error"]  # Ollama's shape: {"error": "..."}
            assert path in why and "operator key" in why and "'team'" in why
        # nothing reached the server: the model a refused delete named is still there
        assert "qwen2:7b" in listed(http, OP)["tags"]
        # an unload takes the model from everyone: operator only; a load is any request's first step
        unload = {"model": "llama3", "prompt": "", "keep_alive": 0, "stream": False}
        refused = http.post("/api/generate", json=unload, headers=bearer(key))
        assert refused.status_code == 403 and "unloading a model" in refused.json()["error"]
        load = http.post("/api/generate", json={"model": "llama3", "stream": False}, headers=bearer(key))
        assert load.status_code == 200 and load.json()["done_reason"] == "load"
        for method, path, body in MANAGEMENT:
            done = http.request(method, path, json=body, headers=OP)
            assert done.status_code == 200, (path, done.text)
        assert "qwen2:7b" not in listed(http, OP)["tags"]
        unloaded = http.post("/api/generate", json=unload, headers=OP)
        assert unloaded.status_code == 200 and unloaded.json()["done_reason"] == "unload"


def test_a_key_limited_to_some_models_may_not_load_another(fleet, router):
    key = make_key("llamas", "--models", "llama3*")
    server = router(ROUTER_API_KEY=OPERATOR)
    load = {"model": "qwen2:7b", "messages": [], "stream": False}
    refused = httpx.post(server.url + "/api/chat", json=load, headers=bearer(key), timeout=30)
    assert refused.status_code == 403 and refused.json()["error"].endswith("may not use the model 'qwen2:7b'")


def test_an_open_router_lists_everything_and_lets_anyone_manage_the_fleet(fleet, router):
    server = router()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert listed(http, {})["tags"] == {"llama3:latest", "llama3.1:8b", "qwen2:7b"}
        for method, path, body in MANAGEMENT:
            done = http.request(method, path, json=body)
            assert done.status_code == 200, (path, done.text)


def test_the_access_line_of_a_refusal_names_the_key(served, router):
    once = make_key("once", "--rpm", "1")
    gone = make_key("gone")
    ClientKey.objects.filter(name="gone").update(enabled=False)
    server = router(ROUTER_API_KEY=OPERATOR)
    clear_of_minute_edge()
    cases = [
        ("ok", bearer(once), 200, "once"),
        ("over", bearer(once), 429, "once"),
        ("disabled", {"x-api-key": gone}, 403, "gone"),
        ("unknown", bearer("nr-not-a-key"), 401, "-"),
        ("missing", {}, 401, "-"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for request_id, headers, status, _ in cases:
            reply = http.post("/api/chat", json=CHAT, headers={**headers, "X-Request-Id": request_id})
            assert reply.status_code == status, reply.text

    def line(request_id: str) -> str | None:
        found = re.search(rf"POST /api/chat (\d+) .* client=(\S+) request_id={request_id}\n", server.log())
        return f"{found[1]} {found[2]}" if found else None

    wait_until(lambda: all(line(request_id) for request_id, *_ in cases))
    assert {request_id: line(request_id) for request_id, *_ in cases} == {
        request_id: f"{status} {client}" for request_id, _, status, client in cases
    }
    assert metric(server.url, "router_client_requests_total", client="once", status="429") == 1


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_stream_cut_before_its_usage_is_charged_what_it_relayed(fakes, endpoint, router, path):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=20, delay=0.01)
    endpoint(fake.url, max_concurrent_connections=4)
    key = make_key("cutter", "--daily-tokens", "30")
    server = router(ROUTER_API_KEY=OPERATOR)
    body = {**OPENAI_CHAT, "stream": True} if path.startswith("/v1") else {**CHAT, "stream": True}
    statuses = []
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(key)) as http:
        for _ in range(4):
            with http.stream("POST", path, json=body) as reply:
                statuses.append(reply.status_code)
                if reply.status_code != 200:
                    continue
                records = (line for line in reply.iter_lines() if line)  # NDJSON lines, SSE data lines
                got = [next(records) for _ in range(15)]  # 15 of the 20 tokens, then hang up
                assert all("tok" in line for line in got[1:])
            # what the router relayed is charged once the stream is closed
            wait_until(
                lambda: http.get("/api/me").json()["usage"]["tokens_today"] >= 15 * statuses.count(200)
            )
        assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]  # 30 tokens a day: 2 streams
        used = http.get("/api/me").json()["usage"]["tokens_today"]
        assert 30 <= used <= 2 * 22  # about one per record relayed, the final one never sent
    assert len(fake.stats.bodies_for(path)) == 2  # the refused ones never reached the server


def test_legacy_embeddings_without_usage_charge_the_prompts_estimate(served, router):
    key = make_key("embedder", "--tpm", "100")
    server = router(ROUTER_API_KEY=OPERATOR)
    clear_of_minute_edge()
    body = {"model": "llama3", "prompt": "word " * 200}  # 1,000 characters: about 250 tokens
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(key)) as http:
        assert http.post("/api/embeddings", json=body).status_code == 200
        assert http.get("/api/me").json()["usage"]["tokens_this_minute"] == 250
        refused = http.post("/api/embeddings", json=body)
        assert refused.status_code == 429 and "100 tokens per minute" in refused.json()["error"]
    wait_until(lambda: TokenTotal.objects.filter(client="embedder").exists(), timeout=15)
    row = TokenTotal.objects.get(client="embedder")  # recorded as a request, no tokens invented
    assert (row.requests, row.total_tokens) == (1, 0)
