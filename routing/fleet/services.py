"""Workflows that change the fleet. The admin, management commands and tests call these;
each one tells the running router about the change so it applies to the next request."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import transaction

from routing.auth.keys import router_key
from routing.core.names import name_list
from routing.fleet import caches, control
from routing.fleet.registry import registry
from routing.models import Endpoint, FallbackChain, ModelAlias, RouterSettings, normalise_url


def endpoints_changed(endpoint_ids: list[int] | None = None) -> None:
    """Invalidate in-process state now, and tell the other router processes."""
    registry.invalidate()
    if endpoint_ids is None:
        caches.invalidate_endpoint(None)
    else:
        for endpoint_id in endpoint_ids:
            caches.invalidate_endpoint(endpoint_id)
    registry.refresh_soon_threadsafe()  # in the server's loop now: queued requests see new limits at once
    control.broadcast_sync(endpoint_ids)


def model_routes_changed() -> None:
    """A model alias or fallback chain was created, changed or deleted: this process reloads
    its copy before the next request (routing/fleet/registry.py loads them with the endpoints),
    and the other router processes are told, as for an endpoint change (no endpoint's caches
    are dropped: `ids` is empty)."""
    registry.invalidate()
    registry.refresh_soon_threadsafe()
    control.broadcast_sync([])


def endpoints_set_enabled(*, endpoint_ids: list[int], enabled: bool) -> int:
    count = Endpoint.objects.filter(id__in=endpoint_ids).update(enabled=enabled)
    transaction.on_commit(lambda: endpoints_changed(endpoint_ids))
    return count


def router_api_key_set(*, key: str) -> None:
    settings_row = RouterSettings.load()
    settings_row.api_key = key
    settings_row.save()
    router_key.set_stored(key)
    endpoints_changed(None)


# -- NOMYO Router config.yaml ----------------------------------------------------------
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any) -> str:
    """`${NAME}` is replaced by the environment variable NAME (empty if unset)."""
    text = "" if value is None else str(value)
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), text)


@dataclass
class ImportResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    api_key_set: bool = False
    aliases: int = 0  # aliases created or changed
    fallbacks: int = 0  # fallback chains created or changed

    def __str__(self) -> str:
        key = ", router api key set" if self.api_key_set else ""
        routes = ""
        if self.aliases or self.fallbacks:
            routes = f", {self.aliases} aliases and {self.fallbacks} fallback chains set"
        return f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged{key}{routes}"


class ConfigError(Exception):
    pass


# The ranges of Endpoint.tier (PositiveSmallIntegerField) and Endpoint.weight (PositiveIntegerField).
_RANGES = {"tier": (0, 32767), "weight": (1, 2**31 - 1)}


@dataclass(frozen=True, slots=True)
class _Wanted:
    """One endpoint of the config. tier/weight None: not given, so an existing endpoint keeps
    its own (set in the admin) and a new one gets the default (tier 0, weight 1)."""

    url: str
    kind: Endpoint.Kind
    tier: int | None
    weight: int | None


def _setting(item: dict[Any, Any], name: str, where: str) -> int | None:
    if name not in item:
        return None
    value = item[name]
    low, high = _RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: {name} must be a whole number from {low} to {high}, not {value!r}")
    return value


def _entry(item: Any, where: str) -> tuple[str, int | None, int | None]:
    """A url, or a mapping {url, tier?, weight?}: (url, tier, weight)."""
    if isinstance(item, str):
        return item, None, None
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a url or a mapping with url, tier and weight")
    unknown = sorted(str(k) for k in item if k not in ("url", "tier", "weight"))
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(unknown)} (accepted: url, tier, weight)")
    url = item.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{where}: url must be given, as a string")
    return url, _setting(item, "tier", where), _setting(item, "weight", where)


def _wanted(data: dict[Any, Any]) -> list[_Wanted]:
    wanted: list[_Wanted] = []
    for field, kind in (
        ("endpoints", Endpoint.Kind.OLLAMA),
        ("llama_server_endpoints", Endpoint.Kind.OPENAI),
    ):
        items = data.get(field) or []
        if not isinstance(items, list):
            raise ConfigError(f"{field} must be a list of urls")
        for index, item in enumerate(items):
            raw, tier, weight = _entry(item, f"{field}[{index}]")
            url = normalise_url(_expand(raw))
            kind_here: Endpoint.Kind = kind
            if kind == Endpoint.Kind.OLLAMA and url.endswith("/v1"):
                kind_here = Endpoint.Kind.OPENAI  # NOMYO lists OpenAI-compatible servers here too
            wanted.append(_Wanted(url, kind_here, tier, weight))
    return wanted


def _clean(ep: Endpoint) -> None:
    """The model's own validation (url shape and kind, ranges), as a ConfigError naming the url."""
    try:
        ep.full_clean()
    except ValidationError as exc:
        problems = "; ".join(f"{field}: {' '.join(errors)}" for field, errors in exc.message_dict.items())
        raise ConfigError(f"{ep.url}: {problems}") from None


def import_config(data: Any) -> ImportResult:
    """NOMYO Router's config.yaml, read: `endpoints` and `llama_server_endpoints` (each item a
    url, or a mapping `{url, tier, weight}`), `max_concurrent_connections`, `api_keys`,
    `nomyo-router-api-key`, and the router's own `aliases` and `fallbacks` (a mapping of a name
    to a list of names). ConfigError names what is wrong; nothing is written then."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping")
    limit = data.get("max_concurrent_connections", 1)
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError("max_concurrent_connections must be a positive integer")
    keys = data.get("api_keys") or {}
    if not isinstance(keys, dict):
        raise ConfigError("api_keys must be a mapping of url to key")
    keys = {normalise_url(str(url)): _expand(key) for url, key in keys.items()}
    wanted = _wanted(data)
    aliases = _name_lists(data, "aliases")
    chains = _name_lists(data, "fallbacks")
    result = ImportResult()
    with transaction.atomic():
        for want in wanted:
            url, kind = want.url, want.kind
            api_key = keys.get(url, "")
            ep = Endpoint.objects.filter(url=url).first()
            if ep is None:
                ep = Endpoint(
                    url=url,
                    kind=kind,
                    api_key=api_key,
                    max_concurrent_connections=limit,
                    tier=0 if want.tier is None else want.tier,
                    weight=1 if want.weight is None else want.weight,
                )
                _clean(ep)
                ep.save()
                result.created += 1
                continue
            tier = ep.tier if want.tier is None else want.tier
            weight = ep.weight if want.weight is None else want.weight
            before = (ep.kind, ep.api_key, ep.max_concurrent_connections, ep.tier, ep.weight)
            if before != (kind, api_key, limit, tier, weight):
                ep.kind, ep.api_key, ep.max_concurrent_connections = kind, api_key, limit
                ep.tier, ep.weight = tier, weight
                _clean(ep)
                ep.save()
                result.updated += 1
            else:
                result.unchanged += 1
        new_key = _expand(data.get("nomyo-router-api-key")) if data.get("nomyo-router-api-key") else ""
        if new_key:
            row = RouterSettings.load()
            if row.api_key != new_key:
                row.api_key = new_key
                row.save()
            result.api_key_set = True
        # Aliases first: a chain's validation reads them.
        for name, targets in aliases:
            result.aliases += _upsert(ModelAlias, "name", name, "targets", targets)
        for model, fallbacks in chains:
            result.fallbacks += _upsert(FallbackChain, "model", model, "fallbacks", fallbacks)
    if new_key:
        router_key.set_stored(new_key)
    transaction.on_commit(lambda: endpoints_changed(None))
    if result.aliases or result.fallbacks:
        transaction.on_commit(model_routes_changed)
    return result


def _name_lists(data: dict[str, Any], field: str) -> list[tuple[str, str]]:
    """`aliases:` / `fallbacks:` of the config: a mapping of a name to a list of names (or one
    name, or a comma-separated string), as (name, names one per line)."""
    table = data.get(field) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"{field} must be a mapping of a model name to a list of model names")
    rows: list[tuple[str, str]] = []
    for name, names in table.items():
        if isinstance(names, str):
            names = [names]
        if (
            not isinstance(name, str)
            or not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
        ):
            raise ConfigError(f"{field}: {name!r} must map to a list of model names")
        rows.append((name, "\n".join(name_list(",".join(names)))))
    return rows


def _upsert(
    model: type[ModelAlias] | type[FallbackChain], key: str, name: str, field: str, names: str
) -> int:
    """Create or update one alias or chain by its name (as written); 1 when something changed.
    Raises ConfigError with the model's own validation message."""
    row = model.objects.filter(**{key: name.strip()}).first() or model(**{key: name})
    if row.pk is not None and getattr(row, field) == names and row.enabled:
        return 0
    setattr(row, field, names)
    row.enabled = True
    try:
        row.full_clean()
    except ValidationError as exc:
        raise ConfigError(f"{name!r}: {'; '.join(exc.messages)}") from None
    row.save()
    return 1


def import_config_file(path: str | Path) -> ImportResult:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return import_config(data)
