"""Model aliases and fallback chains through a running router (daphne, real sockets, fake
backends): the alias is listed and served under each server's own name, a fallback answers
when the first model's only server is down or busy past ROUTER_FALLBACK_WAIT, the reply names
the model that answered (X-Router-Model and the body's model field), the token rows keep the
real model and the one asked for, and no slot is left held."""

from __future__ import annotations

import json
import threading

import httpx

from routing.models import FallbackChain, ModelAlias
from stats.models import TokenTotal
from tests.conftest import wait_until
from tests.integration.helpers import in_flight, queued
from tests.integration.test_keys import bearer, make_key


def chat(model: str, *, stream: bool = False) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_an_alias_is_listed_and_reaches_each_server_under_its_own_name(fakes, endpoint, router):
    ollama = fakes(kind="ollama", models=["gpt-oss:120b"], tokens=3)
    cpp = fakes(kind="openai", models=["gpt-oss-120b"], tokens=3)
    endpoint(ollama.url, name="gpu-ollama", max_concurrent_connections=4)
    endpoint(cpp.url + "/v1", name="gpu-cpp", kind="openai", max_concurrent_connections=4)
    ModelAlias.objects.create(name="gpt-oss", targets="gpt-oss:120b\ngpt-oss-120b")
    ModelAlias.objects.create(name="nowhere", targets="not-served:1b")  # listed only when served
    server = router()
    api = httpx.Client(base_url=server.url, timeout=10)

    tags = {m["name"]: m for m in api.get("/api/tags").json()["models"]}
    assert set(tags) == {"gpt-oss:120b", "gpt-oss-120b", "gpt-oss"}
    assert tags["gpt-oss"]["details"] == tags["gpt-oss:120b"]["details"]  # the first target's
    ids = [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert sorted(ids) == ["gpt-oss", "gpt-oss-120b", "gpt-oss:120b"]
    assert api.get("/v1/models/gpt-oss").json()["id"] == "gpt-oss"
    assert api.get("/v1/models/nowhere").status_code == 404
    show = api.post("/api/show", json={"model": "gpt-oss"})
    assert show.status_code == 200 and show.headers["x-router-model"] in ("gpt-oss:120b", "gpt-oss-120b")

    served: dict[str, int] = {}
    for _ in range(12):  # both servers take turns (least busy, random ties)
        reply = api.post("/v1/chat/completions", json=chat("gpt-oss"))
        assert reply.status_code == 200
        served[reply.headers["x-router-model"]] = served.get(reply.headers["x-router-model"], 0) + 1
        assert reply.json()["model"] == reply.headers["x-router-model"]  # the model that answered
    assert set(served) == {"gpt-oss:120b", "gpt-oss-120b"}
    assert {b["model"] for b in ollama.stats.bodies_for("/v1/chat/completions")} == {"gpt-oss:120b"}
    assert {b["model"] for b in cpp.stats.bodies_for("/v1/chat/completions")} == {"gpt-oss-120b"}

    # Ollama's API on both servers: passed through to Ollama, translated for llama.cpp, streamed.
    lines = []
    for _ in range(6):
        with api.stream("POST", "/api/chat", json=chat("gpt-oss", stream=True)) as reply:
            assert reply.status_code == 200
            lines = [json.loads(line) for line in reply.iter_lines() if line]
            assert {line["model"] for line in lines} == {reply.headers["x-router-model"]}
    assert lines[-1]["done"] is True
    assert {b["model"] for b in ollama.stats.bodies_for("/api/chat")} <= {"gpt-oss:120b"}

    load = api.post("/api/generate", json={"model": "gpt-oss", "stream": False})
    assert load.status_code == 200 and load.json()["done_reason"] == "load"
    assert ollama.stats.bodies_for("/api/generate")[-1]["model"] == "gpt-oss:120b"  # its own name
    assert "gpt-oss:120b" in ollama.config.loaded

    wait_until(
        lambda: (
            set(TokenTotal.objects.values_list("model", "requested_model"))
            >= {("gpt-oss:120b", "gpt-oss:latest"), ("gpt-oss-120b:latest", "gpt-oss:latest")}
        )
    )
    assert in_flight(server.url) == 0


def test_a_fallback_answers_when_the_only_server_is_down_and_says_so(fakes, endpoint, router):
    big = fakes(kind="ollama", models=["big:70b"], tokens=2)
    small = fakes(kind="ollama", models=["small:8b"], tokens=2)
    endpoint(big.url, name="big-box")
    endpoint(small.url, name="small-box")
    FallbackChain.objects.create(model="big:70b", fallbacks="small:8b")
    server = router()
    api = httpx.Client(base_url=server.url, timeout=10)
    first = api.post("/api/chat", json=chat("big:70b"))
    assert first.headers["x-router-model"] == "big:70b" and first.json()["model"] == "big:70b"

    big.stop()
    for stream in (False, True):
        reply = api.post("/api/chat", json=chat("big:70b", stream=stream))
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-router-model"] == "small:8b"
        assert reply.headers["x-router-endpoint"] == "small-box"
        models = {json.loads(line)["model"] for line in reply.text.splitlines() if line}
        assert models == {"small:8b"}  # whole and in every chunk
    assert {b["model"] for b in small.stats.bodies_for("/api/chat")} == {"small:8b"}
    wait_until(lambda: TokenTotal.objects.filter(model="small:8b", requested_model="big:70b").exists())
    row = TokenTotal.objects.get(model="small:8b", requested_model="big:70b")
    assert row.requests == 2 and row.total_tokens > 0
    assert in_flight(server.url) == 0


def test_a_fallback_answers_when_the_first_model_stays_busy(fakes, endpoint, router):
    big = fakes(kind="ollama", models=["big:70b"], tokens=40, delay=0.05)  # about 2 s per reply
    small = fakes(kind="ollama", models=["small:8b"], tokens=2)
    endpoint(big.url, name="big-box", max_concurrent_connections=1)
    endpoint(small.url, name="small-box")
    FallbackChain.objects.create(model="big:70b", fallbacks="small:8b")
    server = router(ROUTER_FALLBACK_WAIT="0.3")
    api = httpx.Client(base_url=server.url, timeout=10)

    holding = threading.Thread(target=lambda: api.post("/api/chat", json=chat("big:70b")), daemon=True)
    holding.start()
    wait_until(lambda: in_flight(server.url) == 1)
    reply = api.post("/api/chat", json=chat("big:70b"))
    assert reply.status_code == 200 and reply.headers["x-router-model"] == "small:8b"
    assert reply.json()["model"] == "small:8b"
    assert queued(server.url) == 0
    holding.join(10)
    assert len(big.stats.bodies_for("/api/chat")) == 1  # only the first ever reached it
    wait_until(lambda: in_flight(server.url) == 0)


def test_an_alias_added_in_the_admin_serves_the_very_next_request(fakes, endpoint, router):
    from django.contrib.auth import get_user_model

    from tests.integration.test_admin_changes import _admin_session, _csrf

    get_user_model().objects.create_superuser("ops", password="a-long-test-password")
    gpu = fakes(kind="ollama", models=["llama3:8b"], tokens=2)
    endpoint(gpu.url, name="gpu")
    # A long reload interval: only the admin's own notification can explain a prompt change.
    server = router(ROUTER_REGISTRY_RELOAD="600")
    api = httpx.Client(base_url=server.url, timeout=10)
    assert api.post("/api/chat", json=chat("fast")).status_code == 404
    admin = _admin_session(server.url)
    token = _csrf(admin, "/admin/routing/modelalias/add/")
    data = {
        "name": "fast",
        "targets": "llama3:8b",
        "enabled": "on",
        "notes": "",
        "csrfmiddlewaretoken": token,
    }
    assert admin.post("/admin/routing/modelalias/add/", data=data).status_code == 302
    reply = api.post("/api/chat", json=chat("fast"))
    assert reply.status_code == 200 and reply.headers["x-router-model"] == "llama3:8b"
    assert "fast" in [m["name"] for m in api.get("/api/tags").json()["models"]]


def test_a_key_sees_and_uses_an_alias_by_the_models_it_stands_for(fakes, endpoint, router):
    ollama = fakes(kind="ollama", models=["mistral:latest", "qwen2:7b", "llama3:latest"], tokens=2)
    endpoint(ollama.url, name="gpu", max_concurrent_connections=4)
    ModelAlias.objects.create(name="llama3-big", targets="mistral")  # named like what the key may use
    ModelAlias.objects.create(name="qwen-alias", targets="qwen2:7b")
    key = make_key("team-a", "--models", "llama3*,qwen2:7b")
    server = router(ROUTER_API_KEY="operator-key")
    api = httpx.Client(base_url=server.url, timeout=10, headers=bearer(key))
    tags = {m["name"] for m in api.get("/api/tags").json()["models"]}
    assert tags == {"llama3:latest", "qwen2:7b", "qwen-alias"}
    assert {m["id"] for m in api.get("/v1/models").json()["data"]} == tags
    assert api.get("/v1/models/llama3-big").status_code == 404
    refused = api.post("/api/chat", json=chat("llama3-big"))
    assert refused.status_code == 403 and "llama3-big" in refused.json()["error"]
    assert (
        api.post("/v1/chat/completions", json=chat("llama3-big")).json()["error"]["code"]
        == "model_not_allowed"
    )
    served = api.post("/api/chat", json=chat("qwen-alias"))
    assert served.status_code == 200 and served.headers["x-router-model"] == "qwen2:7b"
    assert {b["model"] for b in ollama.stats.bodies_for("/api/chat")} == {"qwen2:7b"}  # mistral never reached
