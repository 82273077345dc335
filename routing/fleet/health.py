"""What the fleet can do right now: probes of each endpoint, cached, and the candidates for a model."""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from routing.core.events import Signal
from routing.fleet import caches
from routing.fleet.breaker import State, breakers
from routing.fleet.probes import EMPTY, ModelList, ProbeError, fetch_advertised, fetch_loaded, fetch_version
from routing.fleet.registry import EndpointInfo, registry

log = logging.getLogger("routing.fleet")


# -- the breaker's probes ----------------------------------------------------------------
_reprobes: dict[int, asyncio.Task[None]] = {}
# Sent when the background upkeep finds an endpoint's models, loaded models or version changed.
models_changed: Signal[[]] = Signal("fleet.models_changed")


def mark_failing(ep: EndpointInfo, reason: str) -> None:
    """Strong evidence about the server (refused, connect timeout, a failed probe): open its
    breaker at once and probe it in the background until it answers."""
    server_failed(ep, reason, strong=True)


def server_failed(ep: EndpointInfo, reason: str, *, strong: bool) -> None:
    """Record a failure that says something about the server (see routing/fleet/breaker.py)."""
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
        models_changed.send()


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
