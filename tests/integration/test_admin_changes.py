"""A change made in the admin of a running router applies to its very next proxied request."""

from __future__ import annotations

import itertools
import re

import httpx
from django.contrib.auth import get_user_model

_TURN = itertools.count()


def chat() -> dict[str, object]:
    """A new conversation each time: prompt-cache affinity (which keeps a conversation on its
    server) stays out of what these tests watch, the choice among servers."""
    return {
        "model": "llama3",
        "messages": [{"role": "user", "content": f"hi {next(_TURN)}"}],
        "stream": False,
    }


def _admin_session(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=10)
    page = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    reply = client.post(
        "/admin/login/?next=/admin/",
        data={"username": "ops", "password": "a-long-test-password", "csrfmiddlewaretoken": token.group(1)},
    )
    assert reply.status_code == 302, reply.text[:500]
    return client


def _csrf(client: httpx.Client, path: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', client.get(path).text)
    assert match is not None
    return match.group(1)


def test_it_applies_an_admin_change_to_the_next_request(fakes, endpoint, router):
    get_user_model().objects.create_superuser("ops", password="a-long-test-password")
    first = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], tokens=2)
    second = fakes(kind="ollama", models=["llama3:latest"], tokens=2)
    preferred = endpoint(first.url, name="loaded-one", max_concurrent_connections=4)
    endpoint(second.url, name="other-one", max_concurrent_connections=4)
    # A long reload interval: only the admin's own notification can explain a prompt change.
    server = router(ROUTER_REGISTRY_RELOAD="600")
    api = httpx.Client(base_url=server.url, timeout=10)
    assert api.post("/api/chat", json=chat()).headers["x-router-endpoint"] == "loaded-one"

    admin = _admin_session(server.url)
    token = _csrf(admin, "/admin/routing/endpoint/")
    reply = admin.post(
        "/admin/routing/endpoint/",
        data={"action": "disable", "_selected_action": [str(preferred.id)], "csrfmiddlewaretoken": token},
    )
    assert reply.status_code == 302
    assert api.post("/api/chat", json=chat()).headers["x-router-endpoint"] == "other-one"
    assert [m["name"] for m in api.get("/api/tags").json()["models"]] == ["llama3:latest"]

    token = _csrf(admin, f"/admin/routing/endpoint/{preferred.id}/change/")
    data = {
        "name": "renamed",
        "url": preferred.url,
        "kind": "ollama",
        "enabled": "on",
        "max_concurrent_connections": "4",
        "tier": "0",
        "weight": "1",
        "notes": "",
        "csrfmiddlewaretoken": token,
    }
    assert admin.post(f"/admin/routing/endpoint/{preferred.id}/change/", data=data).status_code == 302
    assert api.post("/api/chat", json=chat()).headers["x-router-endpoint"] == "renamed"

    # A higher tier: the loaded server is passed over for the other from the next request on.
    data["csrfmiddlewaretoken"] = _csrf(admin, f"/admin/routing/endpoint/{preferred.id}/change/")
    data["tier"] = "1"
    assert admin.post(f"/admin/routing/endpoint/{preferred.id}/change/", data=data).status_code == 302
    assert api.post("/api/chat", json=chat()).headers["x-router-endpoint"] == "other-one"


def test_it_keeps_endpoint_state_fresh_in_the_background(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], version="0.12.7")
    endpoint(fake.url, name="idle-one")
    router(ROUTER_LOADED_TTL="1")
    from tests.conftest import wait_until

    # No client sends anything: the router itself keeps models, loaded models and version warm.
    wait_until(lambda: fake.stats.snapshot()["requests"].get("/api/ps", 0) >= 3, timeout=10)
    requests = fake.stats.snapshot()["requests"]
    assert requests.get("/api/version", 0) >= 1 and requests.get("/api/tags", 0) >= 1
