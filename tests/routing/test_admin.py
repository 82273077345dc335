"""The fleet in the admin: list with state, secrets never shown, bulk actions, check now, tiers
and weights."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.test import Client

from routing.fleet import caches
from routing.models import Endpoint


@pytest.fixture
def staff_client(db) -> Client:
    user = get_user_model().objects.create_superuser("admin", password="pw-for-tests")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture(autouse=True)
def clean_caches():
    caches.clear_all()
    yield
    caches.clear_all()


def test_it_never_shows_an_api_key_back(staff_client: Client):
    ep = Endpoint.objects.create(url="http://gpu-1:11434", name="gpu-1", api_key="sk-very-secret")
    page = staff_client.get(f"/admin/routing/endpoint/{ep.id}/change/")
    assert page.status_code == 200 and b"sk-very-secret" not in page.content
    listing = staff_client.get("/admin/routing/endpoint/")
    assert listing.status_code == 200 and b"sk-very-secret" not in listing.content


def test_it_keeps_the_key_when_the_field_is_left_empty(staff_client: Client):
    ep = Endpoint.objects.create(url="http://gpu-1:11434", name="gpu-1", api_key="sk-keep")
    data = {
        "name": "renamed",
        "url": ep.url,
        "kind": "ollama",
        "api_key": "",
        "enabled": "on",
        "max_concurrent_connections": 2,
        "tier": 0,
        "weight": 1,
        "notes": "",
    }
    reply = staff_client.post(f"/admin/routing/endpoint/{ep.id}/change/", data)
    assert reply.status_code == 302
    ep.refresh_from_db()
    assert (ep.name, ep.api_key, ep.max_concurrent_connections) == ("renamed", "sk-keep", 2)


def test_it_normalises_and_validates_urls(staff_client: Client):
    data = {
        "name": "x",
        "url": "http://gpu-3:11434/",
        "kind": "ollama",
        "enabled": "on",
        "max_concurrent_connections": 1,
        "tier": 0,
        "weight": 1,
        "notes": "",
    }
    assert staff_client.post("/admin/routing/endpoint/add/", data).status_code == 302
    assert Endpoint.objects.get().url == "http://gpu-3:11434"
    bad = {**data, "url": "http://llama:8080", "kind": "openai"}
    page = staff_client.post("/admin/routing/endpoint/add/", bad)
    assert page.status_code == 200 and b"ends in /v1" in page.content


def test_it_edits_tier_and_weight_and_refuses_a_weight_below_one(staff_client: Client):
    ep = Endpoint.objects.create(url="http://cpu-1:11434", name="cpu-1")
    assert (ep.tier, ep.weight) == (0, 1)
    form = staff_client.get(f"/admin/routing/endpoint/{ep.id}/change/")
    assert b'name="tier"' in form.content and b'name="weight"' in form.content
    data = {
        "name": "cpu-1",
        "url": ep.url,
        "kind": "ollama",
        "enabled": "on",
        "max_concurrent_connections": 1,
        "tier": 2,
        "weight": 3,
        "notes": "",
    }
    assert staff_client.post(f"/admin/routing/endpoint/{ep.id}/change/", data).status_code == 302
    ep.refresh_from_db()
    assert (ep.tier, ep.weight) == (2, 3)
    for bad in ({"weight": 0}, {"tier": -1}, {"weight": ""}):
        page = staff_client.post(f"/admin/routing/endpoint/{ep.id}/change/", {**data, **bad})
        assert page.status_code == 200 and b"errorlist" in page.content
    ep.refresh_from_db()
    assert (ep.tier, ep.weight) == (2, 3)


def test_it_lists_tier_and_weight_and_filters_by_tier(staff_client: Client):
    Endpoint.objects.create(url="http://gpu-1:11434", name="gpu-one", weight=3)
    Endpoint.objects.create(url="http://cpu-1:11434", name="cpu-one", tier=1)
    listing = staff_client.get("/admin/routing/endpoint/")
    assert b"column-tier" in listing.content and b"column-weight" in listing.content
    assert b'<td class="field-weight">3</td>' in listing.content
    tier_one = staff_client.get("/admin/routing/endpoint/?tier__exact=1")
    assert tier_one.status_code == 200
    assert b"cpu-one" in tier_one.content and b"gpu-one" not in tier_one.content


def test_the_database_refuses_a_weight_below_one(db):
    """The check constraint of the migration (endpoint_weight_at_least_one), past any form."""
    with pytest.raises(IntegrityError), transaction.atomic():
        Endpoint.objects.create(url="http://gpu-1:11434", weight=0)
    assert not Endpoint.objects.exists()


def test_it_disables_and_enables_in_bulk(staff_client: Client):
    ids = [Endpoint.objects.create(url=f"http://gpu-{i}:11434").id for i in range(3)]
    staff_client.post("/admin/routing/endpoint/", {"action": "disable", "_selected_action": ids[:2]})
    assert list(Endpoint.objects.order_by("id").values_list("enabled", flat=True)) == [False, False, True]
    staff_client.post("/admin/routing/endpoint/", {"action": "enable", "_selected_action": ids[:1]})
    assert list(Endpoint.objects.order_by("id").values_list("enabled", flat=True)) == [True, False, True]


def test_it_checks_an_endpoint_now(staff_client: Client, fakes):
    fake = fakes(kind="ollama", models=["llama3:latest", "qwen2:7b"], version="0.12.3")
    ep = Endpoint.objects.create(url=fake.url, name="gpu-1")
    dead = Endpoint.objects.create(url="http://127.0.0.1:9", name="dead")
    reply = staff_client.post(
        "/admin/routing/endpoint/", {"action": "check_now", "_selected_action": [ep.id, dead.id]}, follow=True
    )
    text = reply.content.decode().lower()
    assert "gpu-1: version 0.12.3; llama3:latest, qwen2:7b" in text
    assert "dead: connection refused" in text
    listing = staff_client.get("/admin/routing/endpoint/").content.decode()
    assert "healthy" in listing and "failing (breaker open): connection refused, since " in listing


# -- client keys (issue 14) --------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_adding_a_client_key_shows_it_once_and_stores_only_its_hash(staff_client: Client, settings):
    import re

    from routing.auth.client_keys import hash_key
    from routing.models import ClientKey

    settings.REDIS_URL = ""
    data = {"name": "team-a", "enabled": "on", "priority": "high", "rpm": "60", "allowed_models": "llama3*"}
    added = staff_client.post("/admin/routing/clientkey/add/", data, follow=True)
    assert added.status_code == 200
    shown = re.findall(rb"nr-[A-Za-z0-9_-]{43}", added.content)
    assert len(shown) == 1
    key = shown[0].decode()
    row = ClientKey.objects.get(name="team-a")
    assert row.key_hash == hash_key(key) and row.prefix == key[:11] and row.rpm == 60
    listing = staff_client.get("/admin/routing/clientkey/")
    assert listing.status_code == 200 and key[:11].encode() in listing.content
    assert key.encode() not in listing.content  # never again
    for text in (b"rpm 60", b"tokens today", b"tokens this month", b"last used"):
        assert text in listing.content.lower(), text
    change = staff_client.get(f"/admin/routing/clientkey/{row.pk}/change/")
    assert change.status_code == 200 and key.encode() not in change.content
    revoked = staff_client.post(
        "/admin/routing/clientkey/", {"action": "revoke", "_selected_action": [row.pk]}, follow=True
    )
    assert revoked.status_code == 200 and not ClientKey.objects.get(pk=row.pk).enabled


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "field,value",
    [
        ("rpm", "0"),
        ("tpm", "0"),
        ("concurrency", "0"),
        ("daily_tokens", "0"),
        ("monthly_tokens", "0"),
        ("rpm", "-1"),
        ("allowed_models", ",,, ,"),  # names no model: it used to make a key for every model
        ("name", "=1+1,x"),
        ("name", "a\nb"),
        ("name", "-"),
        ("name", "Anonymous"),
    ],
)
def test_the_client_key_form_refuses_what_would_misbehave(staff_client: Client, settings, field, value):
    from routing.models import ClientKey

    settings.REDIS_URL = ""
    data = {"name": "team-a", "enabled": "on", "priority": "normal", field: value}
    refused = staff_client.post("/admin/routing/clientkey/add/", data)
    assert refused.status_code == 200  # the form again, with the error
    assert field in refused.context["adminform"].form.errors
    assert not ClientKey.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_new_client_key_is_in_no_cookie(staff_client: Client, settings):
    """The add response redirects; the message that carries the key stays server-side (session
    storage), not in the signed but readable `messages` cookie, and leaves the session once shown."""
    import re

    settings.REDIS_URL = ""
    data = {"name": "team-a", "enabled": "on", "priority": "normal"}
    added = staff_client.post("/admin/routing/clientkey/add/", data)
    assert added.status_code == 302
    assert "messages" not in added.cookies
    shown = staff_client.get(added["Location"])
    keys = re.findall(rb"nr-[A-Za-z0-9_-]{43}", shown.content)
    assert len(keys) == 1
    key = keys[0].decode()
    assert all(key not in morsel.value for morsel in (*added.cookies.values(), *shown.cookies.values()))
    assert key not in str(dict(staff_client.session))  # shown once, then gone from the session too
