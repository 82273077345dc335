"""The candidates for a model: the enabled endpoints that advertise it, whether each has it loaded.

Reads the caches (fresh entries without a task) and falls back to probing; an endpoint whose
breaker is open is no candidate. An alias (routing/fleet/routes.py) has the candidates of all its
targets, in the alias's order, each with the name its own server gives the model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from routing.auth.principal import Principal
from routing.core.names import model_key
from routing.fleet import caches
from routing.fleet.breaker import breakers
from routing.fleet.health import advertised_or_none, loaded_or_empty
from routing.fleet.probes import EMPTY, ModelList
from routing.fleet.registry import EndpointInfo, registry


@dataclass(frozen=True, slots=True)
class Candidate:
    endpoint: EndpointInfo
    backend_model: str  # the name the backend advertises (a real model, never an alias)
    loaded: bool
    # The real model's key (`model_key(backend_model)`, filled in when not given): what its
    # slots, queue and token counts are kept under.
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", model_key(self.backend_model))


@dataclass(frozen=True, slots=True)
class Lookup:
    candidates: list[Candidate]
    reachable: int  # enabled endpoints that answered
    failing_with_model: int = 0  # endpoints with an open breaker that advertised the model


async def gather_advertised(
    endpoints: tuple[EndpointInfo, ...],
) -> list[tuple[EndpointInfo, ModelList | None]]:
    """Each endpoint with its models, or None when its breaker is open."""
    # Fast path: everything fresh in the caches, no task created.
    found: list[tuple[EndpointInfo, ModelList | None]] = []
    for ep in endpoints:
        if breakers.is_open(ep.id):
            found.append((ep, None))
            continue
        models = caches.advertised.peek(ep.id)
        if models is None:
            results = await asyncio.gather(*(advertised_or_none(e) for e in endpoints))
            return list(zip(endpoints, results, strict=True))
        found.append((ep, models))
    return found


async def gather_loaded(endpoints: list[EndpointInfo]) -> list[ModelList]:
    found: list[ModelList] = []
    for ep in endpoints:
        cached = caches.loaded.peek(ep.id) if ep.is_ollama else EMPTY
        if cached is None:
            return list(await asyncio.gather(*(loaded_or_empty(e) for e in endpoints)))
        found.append(cached)
    return found


def usable_by(lookup: Lookup, principal: Principal) -> Lookup:
    """`lookup` with only the candidates whose real model `principal` may use: an alias reaches
    only the targets the key may use (routing/fleet/routes.py). The same lookup for a principal
    without a model list."""
    if not principal.models:
        return lookup
    return replace(lookup, candidates=[c for c in lookup.candidates if principal.may_use(c.key)])


async def candidates_for(model: str) -> Lookup:
    """The candidates for `model`, a model or an alias name (any spelling)."""
    endpoints = await registry.enabled()
    alias = registry.cached_routes().alias(model)
    keys = [model_key(model)] if alias is None else [model_key(name) for name in alias.targets]
    matches: list[tuple[EndpointInfo, str, str]] = []  # endpoint, its name for the model, key
    reachable = 0
    failing_with_model = 0
    for ep, models in await gather_advertised(endpoints):
        if models is None:
            last_seen = caches.advertised.peek(ep.id)
            if last_seen is not None and any(key in last_seen.keys for key in keys):
                failing_with_model += 1
            continue
        reachable += 1
        for key in keys:
            name = models.backend_name(key)
            if name is not None:
                matches.append((ep, name, key))
    if len(keys) > 1:
        # An alias's targets in the alias's order, then the endpoints' order.
        rank = {key: i for i, key in enumerate(keys)}
        matches.sort(key=lambda m: rank[m[2]])
    loaded = await gather_loaded([ep for ep, _, _ in matches])
    candidates = [
        Candidate(ep, name, key in names.keys, key)
        for (ep, name, key), names in zip(matches, loaded, strict=True)
    ]
    return Lookup(candidates, reachable, failing_with_model)


@dataclass(frozen=True, slots=True)
class Listed:
    """One line of a merged model list (/api/tags, /v1/models)."""

    endpoint: EndpointInfo  # the server whose entry describes it
    entry: dict[str, Any]  # that server's own entry for the model
    name: str  # the name to list: the server's spelling, or the alias's name


async def listing() -> list[Listed]:
    """Every model the enabled endpoints advertise, once each (by `model_key`, the first
    server's entry), then each alias with at least one target advertised, described by the
    entry of its first target found. An alias named like a real model stands in its place
    (requests for that name go to the alias)."""
    endpoints = await registry.enabled()
    aliases = registry.cached_routes().aliases
    first: dict[str, Listed] = {}  # model key -> its first entry
    for ep, found in await gather_advertised(endpoints):
        if found is None:
            continue
        for entry, name in zip(found.entries, found.names, strict=True):
            first.setdefault(model_key(name), Listed(ep, entry, name))
    listed = [item for key, item in first.items() if key not in aliases]
    for alias in aliases.values():
        served = next((first[k] for k in map(model_key, alias.targets) if k in first), None)
        if served is not None:
            listed.append(Listed(served.endpoint, served.entry, alias.name))
    return listed
