"""The fleet in the admin: state at a glance, bulk enable/disable, and a "check now" probe; client keys;
model aliases and fallback chains."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from routing.auth import client_keys
from routing.auth.quotas import quotas
from routing.core.names import model_key
from routing.engine.board import board
from routing.fleet import caches, control, probes, services
from routing.fleet.breaker import State, breakers
from routing.fleet.registry import EndpointInfo
from routing.models import ClientKey, Endpoint, FallbackChain, ModelAlias, RouterSettings
from routing.server.lifecycle import lifecycle
from routing.upstream import client


class EndpointForm(forms.ModelForm[Endpoint]):
    # Write-only: the stored key is never rendered back into the page.
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Sent as Bearer token. Leave empty to keep the current key.",
    )
    clear_api_key = forms.BooleanField(required=False, help_text="Remove the stored key.")

    class Meta:
        model = Endpoint
        fields = [
            "name",
            "url",
            "kind",
            "api_key",
            "enabled",
            "max_concurrent_connections",
            "tier",
            "weight",
            "notes",
        ]

    def clean_api_key(self) -> str:
        value: str = self.cleaned_data.get("api_key") or ""
        if not value and self.instance.pk:
            return self.instance.api_key
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("clear_api_key"):
            data["api_key"] = ""
        return data


async def _check(ep: EndpointInfo) -> tuple[str | None, probes.ModelList | None, str | None]:
    try:
        version = await probes.fetch_version(ep)
        models = await probes.fetch_advertised(ep)
        return version, models, None
    except probes.ProbeError as exc:
        return None, None, str(exc)
    finally:
        if asyncio.get_running_loop() is not lifecycle.loop:
            await client.close_client()  # a throwaway loop (no server running): close its client


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin[Endpoint]):
    form = EndpointForm
    list_display = [
        "__str__",
        "url",
        "kind",
        "enabled",
        "state",
        "models_advertised",
        "models_loaded",
        "active_requests",
        "max_concurrent_connections",
        "tier",
        "weight",
        "has_api_key",
    ]
    list_filter = ["enabled", "kind", "tier"]
    search_fields = ["name", "url", "notes"]
    readonly_fields = ["created", "updated"]
    actions = ["enable", "disable", "check_now"]

    @admin.display(description="state")
    def state(self, obj: Endpoint) -> str:
        """The circuit breaker in words: why it is out and since when (see routing/fleet/breaker.py)."""
        if not obj.enabled:
            return "disabled"
        view = breakers.view(obj.id)
        if view.since is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.since))
            label = "failing (breaker open)" if view.state is State.OPEN else "on trial (breaker half-open)"
            return f"{label}: {view.reason}, since {since} ({_duration(time.time() - view.since)})"
        return "healthy" if caches.advertised.peek(obj.id) is not None else "unknown (not probed yet)"

    @admin.display(description="models advertised")
    def models_advertised(self, obj: Endpoint) -> str:
        models = caches.advertised.peek(obj.id)
        return ", ".join(models.names) if models else "-"

    @admin.display(description="models loaded")
    def models_loaded(self, obj: Endpoint) -> str:
        models = caches.loaded.peek(obj.id)
        return ", ".join(models.names) if models else "-"

    @admin.display(description="active")
    def active_requests(self, obj: Endpoint) -> int:
        return board.active_for(obj.id)

    @admin.display(description="api key", boolean=True)
    def has_api_key(self, obj: Endpoint) -> bool:
        return bool(obj.api_key)

    def save_model(self, request: HttpRequest, obj: Endpoint, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        transaction.on_commit(lambda: services.endpoints_changed([obj.id]))

    def delete_model(self, request: HttpRequest, obj: Endpoint) -> None:
        endpoint_id = obj.id
        super().delete_model(request, obj)
        transaction.on_commit(lambda: services.endpoints_changed([endpoint_id]))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        ids = list(queryset.values_list("id", flat=True))
        super().delete_queryset(request, queryset)
        transaction.on_commit(lambda: services.endpoints_changed(ids))

    @admin.action(description="Enable selected endpoints")
    def enable(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        ids = list(queryset.values_list("id", flat=True))
        count = services.endpoints_set_enabled(endpoint_ids=ids, enabled=True)
        self.message_user(request, f"{count} enabled.")

    @admin.action(description="Disable selected endpoints")
    def disable(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        ids = list(queryset.values_list("id", flat=True))
        count = services.endpoints_set_enabled(endpoint_ids=ids, enabled=False)
        self.message_user(request, f"{count} disabled.")

    @admin.action(description="Check now: probe the server, report version and models")
    def check_now(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        for ep in queryset:
            version, models, error = async_to_sync(_check)(EndpointInfo.of(ep))
            if error is not None:
                breakers.failed(ep.id, error, strong=True, name=ep.name)  # probed again by the upkeep
                self.message_user(request, f"{ep}: {error}", messages.ERROR)
                continue
            assert models is not None and version is not None
            breakers.reset(ep.id)  # the operator saw it answer: back in rotation
            caches.advertised.put(ep.id, models)
            caches.versions.put(ep.id, version)
            names = ", ".join(models.names) or "no models"
            self.message_user(request, f"{ep}: version {version}; {names}", messages.SUCCESS)


@admin.register(RouterSettings)
class RouterSettingsAdmin(admin.ModelAdmin[RouterSettings]):
    list_display = ["__str__", "has_api_key", "updated"]
    readonly_fields = ["api_key_state", "updated"]
    exclude = ["api_key"]

    @admin.display(description="router api key", boolean=True)
    def has_api_key(self, obj: RouterSettings) -> bool:
        return bool(obj.api_key)

    @admin.display(description="router api key")
    def api_key_state(self, obj: RouterSettings) -> str:
        return "set (hidden)" if obj.api_key else "not set"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not RouterSettings.objects.exists()


class ClientKeyForm(forms.ModelForm[ClientKey]):
    class Meta:
        model = ClientKey
        fields = [
            "name",
            "owner",
            "enabled",
            "expires",
            "allowed_models",
            "priority",
            "rpm",
            "tpm",
            "concurrency",
            "daily_tokens",
            "monthly_tokens",
        ]


@admin.register(ClientKey)
class ClientKeyAdmin(admin.ModelAdmin[ClientKey]):
    """Client keys: the key is made on "add" and shown once, in the message after saving."""

    form = ClientKeyForm
    list_display = [
        "name",
        "prefix",
        "owner",
        "enabled",
        "expires",
        "priority",
        "limits",
        "used_today",
        "used_this_month",
        "last_used",
    ]
    list_filter = ["enabled", "priority"]
    search_fields = ["name", "prefix", "owner__username"]
    readonly_fields = ["prefix", "created", "last_used"]
    actions = ["revoke"]

    @admin.display(description="limits")
    def limits(self, obj: ClientKey) -> str:
        parts = [
            f"{label} {value}"
            for label, value in (
                ("rpm", obj.rpm),
                ("tpm", obj.tpm),
                ("concurrent", obj.concurrency),
                ("per day", obj.daily_tokens),
                ("per month", obj.monthly_tokens),
            )
            if value is not None
        ]
        return ", ".join(parts) or "none"

    @admin.display(description="tokens today")
    def used_today(self, obj: ClientKey) -> int:
        return quotas.usage_sync(client_keys.record_of(obj).principal).tokens_day

    @admin.display(description="tokens this month")
    def used_this_month(self, obj: ClientKey) -> int:
        return quotas.usage_sync(client_keys.record_of(obj).principal).tokens_month

    def save_model(self, request: HttpRequest, obj: ClientKey, form: Any, change: bool) -> None:
        key = None
        if not change:
            key = client_keys.new_key()
            obj.prefix, obj.key_hash = client_keys.prefix_of(key), client_keys.hash_key(key)
        super().save_model(request, obj, form, change)
        transaction.on_commit(control.keys_changed)
        if key is not None:
            message = f"The key of {obj.name!r}, shown only now (only its hash is stored): {key}"
            self.message_user(request, message, messages.WARNING)

    def delete_model(self, request: HttpRequest, obj: ClientKey) -> None:
        super().delete_model(request, obj)
        transaction.on_commit(control.keys_changed)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ClientKey]) -> None:
        super().delete_queryset(request, queryset)
        transaction.on_commit(control.keys_changed)

    @admin.action(description="Revoke (disable) selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ClientKey]) -> None:
        count = queryset.update(enabled=False)
        transaction.on_commit(control.keys_changed)
        self.message_user(request, f"{count} revoked.")


def _served_by(names: list[str]) -> str:
    """Which servers advertise each name now (from the probes' caches), e.g.
    `gpt-oss:120b: gpu-1, gpu-2; gpt-oss-120b: -`."""
    endpoints = {ep.id: ep.display_name for ep in Endpoint.objects.filter(enabled=True)}
    parts = []
    for name in names:
        key = model_key(name)
        servers = [
            label
            for ep_id, label in endpoints.items()
            if (models := caches.advertised.peek(ep_id)) is not None and key in models.keys
        ]
        parts.append(f"{name}: {', '.join(servers) or '-'}")
    return "; ".join(parts)


class _RoutesAdmin:
    """Saving or deleting an alias or a chain applies to the next request, in every process."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)  # type: ignore[misc]
        transaction.on_commit(services.model_routes_changed)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)  # type: ignore[misc]
        transaction.on_commit(services.model_routes_changed)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        super().delete_queryset(request, queryset)  # type: ignore[misc]
        transaction.on_commit(services.model_routes_changed)


@admin.register(ModelAlias)
class ModelAliasAdmin(_RoutesAdmin, admin.ModelAdmin[ModelAlias]):
    """Aliases: a name clients use for one or more real models (routing/fleet/routes.py)."""

    fields = ["name", "targets", "enabled", "notes"]
    list_display = ["name", "target_list", "enabled", "served_by"]
    list_filter = ["enabled"]
    search_fields = ["name", "targets", "notes"]

    @admin.display(description="targets")
    def target_list(self, obj: ModelAlias) -> str:
        return ", ".join(obj.target_names)

    @admin.display(description="served by")
    def served_by(self, obj: ModelAlias) -> str:
        return _served_by(obj.target_names)


@admin.register(FallbackChain)
class FallbackChainAdmin(_RoutesAdmin, admin.ModelAdmin[FallbackChain]):
    """Fallback chains: what to try, in order, when no server for a model can take a request."""

    fields = ["model", "fallbacks", "enabled", "notes"]
    list_display = ["model", "chain", "enabled"]
    list_filter = ["enabled"]
    search_fields = ["model", "fallbacks", "notes"]

    @admin.display(description="then tries")
    def chain(self, obj: FallbackChain) -> str:
        return " → ".join(obj.fallback_names)
