"""Model aliases and fallback chains in the models and the admin: what is refused (blank names,
an alias standing for itself or for another alias, a chain that falls back on itself), how the
lists are kept (one name per line, each once), and that a save or a delete reaches the router
(services.model_routes_changed) once it is committed."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.test import Client

from routing.fleet import services
from routing.models import FallbackChain, ModelAlias

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client() -> Client:
    user = get_user_model().objects.create_superuser("admin", password="pw-for-tests")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def notified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(services, "model_routes_changed", lambda: calls.append("changed"))
    return calls


def alias(name: str, targets: str) -> ModelAlias:
    row = ModelAlias(name=name, targets=targets)
    row.full_clean()
    row.save()
    return row


def test_it_keeps_the_targets_one_per_line_in_order_each_once() -> None:
    row = alias("  gpt-oss ", "gpt-oss:120b, gpt-oss-120b\ngpt-oss:120b\n\n")
    assert row.name == "gpt-oss"
    assert row.targets == "gpt-oss:120b\ngpt-oss-120b"
    assert str(row) == "gpt-oss → gpt-oss:120b, gpt-oss-120b"


@pytest.mark.parametrize(
    ("name", "targets", "field"),
    [
        ("", "llama3", "name"),
        ("   ", "llama3", "name"),
        ("bad\x01name", "llama3", "name"),
        ("fast", "", "targets"),
        ("fast", " , \n", "targets"),
        ("fast", "llama3, fast:latest", "targets"),  # itself, in another spelling
    ],
)
def test_it_refuses_an_alias_without_a_name_or_targets_or_standing_for_itself(
    name: str, targets: str, field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ModelAlias(name=name, targets=targets).full_clean()
    assert field in caught.value.message_dict


def test_it_refuses_aliases_of_aliases_both_ways_and_a_second_spelling() -> None:
    alias("big", "llama3:70b")
    with pytest.raises(ValidationError, match="is an alias"):
        ModelAlias(name="huge", targets="big").full_clean()
    with pytest.raises(ValidationError, match="is a target of the alias"):
        ModelAlias(name="llama3:70b", targets="qwen").full_clean()
    with pytest.raises(ValidationError, match="has this name already"):
        ModelAlias(name="big:latest", targets="qwen").full_clean()


def test_it_refuses_a_chain_that_falls_back_on_itself() -> None:
    alias("big", "llama3:70b\nqwen:72b")
    for model, fallbacks in [("llama3", "llama3:latest"), ("big", "qwen:72b"), ("big", "big:latest")]:
        with pytest.raises(ValidationError) as caught:
            FallbackChain(model=model, fallbacks=fallbacks).full_clean()
        assert "fallbacks" in caught.value.message_dict, (model, fallbacks)
    with pytest.raises(ValidationError) as caught:
        FallbackChain(model="", fallbacks="x").full_clean()
    assert "model" in caught.value.message_dict
    # An alias that also stands for something else is a fallback (its other targets are new).
    FallbackChain(model="llama3:70b", fallbacks="big").full_clean()


def test_it_allows_chains_that_point_at_each_other() -> None:
    # One level: a's chain is a, b; b's is b, a. Neither is followed further.
    for model, fallbacks in [("a", "b"), ("b", "a")]:
        row = FallbackChain(model=model, fallbacks=fallbacks)
        row.full_clean()
        row.save()
    with pytest.raises(ValidationError, match="has a fallback chain already"):
        FallbackChain(model="a:latest", fallbacks="c").full_clean()
    assert str(FallbackChain.objects.get(model="a")) == "a → b"


def test_the_admin_adds_an_alias_and_tells_the_router(
    staff_client: Client, notified: list[str], django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        reply = staff_client.post(
            "/admin/routing/modelalias/add/",
            {"name": "gpt-oss", "targets": "gpt-oss:120b\r\ngpt-oss-120b", "enabled": "on", "notes": ""},
        )
    assert reply.status_code == 302, reply.content[:500]
    assert ModelAlias.objects.get().target_names == ["gpt-oss:120b", "gpt-oss-120b"]
    assert notified == ["changed"]
    listing = staff_client.get("/admin/routing/modelalias/")
    assert listing.status_code == 200 and b"gpt-oss-120b: -" in listing.content  # served by nobody yet


def test_the_admin_shows_the_error_of_a_bad_alias_and_saves_nothing(
    staff_client: Client, notified: list[str]
) -> None:
    reply = staff_client.post(
        "/admin/routing/modelalias/add/", {"name": "x", "targets": "x:latest", "enabled": "on", "notes": ""}
    )
    assert reply.status_code == 200 and b"cannot stand for itself" in reply.content
    assert not ModelAlias.objects.exists() and notified == []


def test_the_admin_adds_and_deletes_a_chain_and_tells_the_router(
    staff_client: Client, notified: list[str], django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        reply = staff_client.post(
            "/admin/routing/fallbackchain/add/",
            {"model": "gpt-4", "fallbacks": "llama3:70b\r\nqwen", "enabled": "on", "notes": ""},
        )
    assert reply.status_code == 302
    row = FallbackChain.objects.get()
    assert row.fallback_names == ["llama3:70b", "qwen"]
    assert b"llama3:70b \xe2\x86\x92 qwen" in staff_client.get("/admin/routing/fallbackchain/").content
    with django_capture_on_commit_callbacks(execute=True):
        reply = staff_client.post(f"/admin/routing/fallbackchain/{row.id}/delete/", {"post": "yes"})
    assert reply.status_code == 302 and not FallbackChain.objects.exists()
    assert notified == ["changed", "changed"]
