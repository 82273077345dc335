"""What the fleet can do right now: probes of each endpoint, cached, and the candidates for a model."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from routing import caches, upstream
from routing.board import Candidate
from routing.breaker import State, breakers
from routing.names import model_key
from routing.registry import EndpointInfo, registry

log = logging.getLogger("routing.fleet")


class ProbeError(Exception):
    pass


async def _get_json(ep: EndpointInfo, url: str) -> Any:
    client = upstream.get_client()
    for retry in (False, True):
        try:
            response = await client.get(
                url,
                headers=upstream.auth_headers(ep.api_key),
                timeout=upstream.timeouts(first_byte=settings.ROUTER_PROBE_TIMEOUT),
            )
            body = response.content
            break
        except (httpx.HTTPError, OSError) as exc:
            failure = upstream.classify(exc)
            if not retry and failure is upstream.Failure.DISCONNECTED:
                continue  # a pooled connection the server closed while idle: once more
            raise ProbeError(failure.value) from exc
    if response.status_code != 200:
        raise ProbeError(f"HTTP {response.status_code} from {url.rsplit('/', 1)[-1]}")
    try:
        return response.json() if body else None
    except ValueError:
        raise ProbeError("malformed JSON") from None


@dataclass(frozen=True, slots=True)
class ModelList:
    """Models as one endpoint reports them: raw entries for listing, keys for matching."""

    entries: tuple[dict[str, Any], ...]
    names: tuple[str, ...]
    keys: frozenset[str]

    def backend_name(self, key: str) -> str | None:
        if key not in self.keys:
            return None
        for name in self.names:
            if model_key(name) == key:
                return name
        return None


EMPTY = ModelList((), (), frozenset())


def _model_list(data: Any, list_key: str, name_keys: tuple[str, ...]) -> ModelList:
    if not isinstance(data, dict) or not isinstance(data.get(list_key), list):
        raise ProbeError(f"unexpected reply: no '{list_key}' list")
    entries: list[dict[str, Any]] = []
    names: list[str] = []
    for item in data[list_key]:
        if isinstance(item, dict):
            for key in name_keys:
                if isinstance(item.get(key), str):
                    entries.append(item)
                    names.append(item[key])
                    break
    return ModelList(tuple(entries), tuple(names), frozenset(model_key(n) for n in names))


async def fetch_advertised(ep: EndpointInfo) -> ModelList:
    if ep.is_ollama:
        return _model_list(await _get_json(ep, ep.url + "/api/tags"), "models", ("name", "model"))
    return _model_list(await _get_json(ep, ep.url + "/models"), "data", ("id",))


async def fetch_loaded(ep: EndpointInfo) -> ModelList:
    if not ep.is_ollama:
        return EMPTY
    return _model_list(await _get_json(ep, ep.url + "/api/ps"), "models", ("name", "model"))


async def fetch_version(ep: EndpointInfo) -> str:
    if not ep.is_ollama:
        await fetch_advertised(ep)  # answers: it is up; OpenAI servers have no version route
        return "openai-compatible"
    data = await _get_json(ep, ep.url + "/api/version")
    if not isinstance(data, dict) or not isinstance(data.get("version"), str):
        raise ProbeError("unexpected reply from /api/version")
    return str(data["version"])


# -- the breaker's probes ----------------------------------------------------------------
_reprobes: dict[int, asyncio.Task[None]] = {}
# Called (cheap, never raising) when an endpoint's state or models change: the page.
listeners: list[Callable[[], None]] = []


def _notify() -> None:
    for listener in listeners:
        listener()


breakers.listeners.append(_notify)


def mark_failing(ep: EndpointInfo, reason: str) -> None:
    """Strong evidence about the server (refused, connect timeout, a failed probe): open its
    breaker at once and probe it in the background until it answers."""
    server_failed(ep, reason, strong=True)


def server_failed(ep: EndpointInfo, reason: str, *, strong: bool) -> None:
    """Record a failure that says something about the server (see routing/breaker.py)."""
    breakers.failed(ep.id, reason, strong=strong, name=ep.name)
    if breakers.is_open(ep.id):
        caches.loaded.invalidate(ep.id)
        _ensure_reprobe(ep)


def _ensure_reprobe(ep: EndpointInfo) -> None:
    task = _reprobes.get(ep.id)
    if task is None or task.done():
        try:
            _reprobes[ep.id] = asyncio.get_running_loop().create_task(_reprobe(ep))
        except RuntimeError:  # no running loop (admin thread): the upkeep loop starts it
            pass


def mark_healthy(ep: EndpointInfo) -> None:
    """A probe answered: an open breaker goes half-open (trial), a half-open one closes."""
    breakers.probe_succeeded(ep.id)


def probe_interval() -> float:
    return max(0.5, settings.ROUTER_FAILING_TTL / 4)


async def _reprobe(ep: EndpointInfo) -> None:
    """Probe an endpoint whose breaker is not closed until it closes (or the endpoint goes)."""
    while True:
        await asyncio.sleep(probe_interval())
        current = {e.id: e for e in registry.cached()}.get(ep.id)
        if current is None or not current.enabled or breakers.view(ep.id).state is State.CLOSED:
            return
        try:
            models = await fetch_advertised(current)
        except ProbeError as exc:
            breakers.failed(ep.id, str(exc), strong=True, name=ep.name)
            continue
        caches.advertised.put(ep.id, models)
        if breakers.probe_succeeded(ep.id) is State.CLOSED:
            log.info("endpoint %s recovered", ep.name)
            return


async def advertised_or_none(ep: EndpointInfo) -> ModelList | None:
    """The endpoint's models, or None when its breaker is open (and opens it on error)."""
    if breakers.is_open(ep.id):
        return None
    try:
        return await caches.advertised.get(ep.id, lambda: fetch_advertised(ep))
    except ProbeError as exc:
        mark_failing(ep, str(exc))
        return None


async def loaded_or_empty(ep: EndpointInfo) -> ModelList:
    if not ep.is_ollama:
        return EMPTY
    try:
        return await caches.loaded.get(ep.id, lambda: fetch_loaded(ep))
    except ProbeError:
        return EMPTY  # the request itself will find out whether the server is up


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


async def candidates_for(model: str) -> Lookup:
    key = model_key(model)
    endpoints = await registry.enabled()
    matches: list[tuple[EndpointInfo, str]] = []
    reachable = 0
    failing_with_model = 0
    for ep, models in await gather_advertised(endpoints):
        if models is None:
            last_seen = caches.advertised.peek(ep.id)
            if last_seen is not None and key in last_seen.keys:
                failing_with_model += 1
            continue
        reachable += 1
        name = models.backend_name(key)
        if name is not None:
            matches.append((ep, name))
    loaded = await gather_loaded([ep for ep, _ in matches])
    candidates = [
        Candidate(ep, name, key in names.keys) for (ep, name), names in zip(matches, loaded, strict=True)
    ]
    return Lookup(candidates, reachable, failing_with_model)


# -- background upkeep -----------------------------------------------------------------
async def _upkeep(ep: EndpointInfo, interval: float) -> None:
    if breakers.view(ep.id).state is not State.CLOSED:
        _ensure_reprobe(ep)  # the re-probe task looks after it (also one opened from the admin)
        return
    before = (caches.advertised.peek(ep.id), caches.loaded.peek(ep.id), caches.versions.peek(ep.id))
    try:
        # Renewed before it runs out, so no request ever waits for the refresh.
        if caches.advertised.expires_in(ep.id) < 3 * interval:
            await caches.advertised.refresh(ep.id, lambda: fetch_advertised(ep))
        if ep.is_ollama:
            await caches.loaded.refresh(ep.id, lambda: fetch_loaded(ep))
        if before[2] is None:
            caches.versions.put(ep.id, await fetch_version(ep))
    except ProbeError as exc:
        mark_failing(ep, str(exc))
        return
    after = (caches.advertised.peek(ep.id), caches.loaded.peek(ep.id), caches.versions.peek(ep.id))
    if after != before:
        _notify()


async def watch() -> None:
    """Keep every enabled endpoint's models, loaded models and version fresh in the background,
    so requests find warm caches and the page never shows stale or missing state."""
    while True:
        interval = max(0.5, min(5.0, settings.ROUTER_LOADED_TTL / 2))
        try:
            endpoints = await registry.enabled()
            await asyncio.gather(*(_upkeep(ep, interval) for ep in endpoints))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("fleet upkeep failed; retrying")
        await asyncio.sleep(interval)
