"""Routes answered from the whole fleet: merged lists, version, health, and fan-out management.

The lists (/api/tags, /api/ps) show a client key only the models it may use (its allowed names
or patterns, routing/auth/principal.py `may_use`); the operator and an open router see all.
The fan-out management routes change every server for everyone: the operator's alone (403 for
a client key, routing/auth/principal.py `may_manage`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse

from routing.auth.principal import principal_of
from routing.core.errors import ApiError
from routing.core.names import model_key
from routing.fleet import caches, candidates, health, probes
from routing.fleet.breaker import breakers
from routing.fleet.context_limits import context_limits
from routing.fleet.registry import EndpointInfo, registry
from routing.protocols.common import schema
from routing.protocols.common.decorators import methods, operator_only
from routing.protocols.common.parsing import optional_bool, parse_checked
from routing.upstream import client as upstream_client
from routing.upstream import failures


def _as_ollama_tag(ep: EndpointInfo, entry: dict[str, Any], name: str) -> dict[str, Any]:
    if ep.is_ollama:
        # An alias is listed with its target's details under its own name.
        return (
            entry if entry.get("name", entry.get("model")) == name else {**entry, "name": name, "model": name}
        )
    # OpenAI-compatible servers list ids only; give Ollama clients the fields they read.
    return {
        "name": name,
        "model": name,
        "modified_at": "1970-01-01T00:00:00Z",
        "size": 0,
        "digest": "",
        "details": {
            "format": "",
            "family": "",
            "families": None,
            "parameter_size": "",
            "quantization_level": "",
        },
    }


@methods("GET")
async def tags(request: HttpRequest) -> HttpResponseBase:
    """The enabled servers' models, once each, and the aliases that can be served
    (routing/fleet/candidates.py `listing`), in Ollama's /api/tags shape; only those the
    caller's key may use (an alias by its targets, routing/fleet/routes.py)."""
    principal, routes = principal_of(request), await registry.routes()
    models = [
        _as_ollama_tag(item.endpoint, item.entry, item.name)
        for item in await candidates.listing()
        if routes.may_use(principal, item.name)
    ]
    return JsonResponse({"models": models})


@methods("GET")
async def ps(request: HttpRequest) -> HttpResponseBase:
    """The models loaded on the Ollama servers, once each; only those the caller's key may use."""
    may_use = principal_of(request).may_use
    endpoints = [ep for ep in await registry.enabled() if ep.is_ollama and not breakers.is_open(ep.id)]
    seen: set[str] = set()
    models: list[dict[str, Any]] = []
    for found in await candidates.gather_loaded(endpoints):
        for entry, name in zip(found.entries, found.names, strict=True):
            if model_key(name) not in seen and may_use(name):
                seen.add(model_key(name))
                models.append(entry)
    return JsonResponse({"models": models})


def _loaded_on_openai(entry: dict[str, Any]) -> bool:
    """An OpenAI-compatible server's model is loaded unless its entry says otherwise (llama.cpp's
    router mode: `"status": {"value": "loaded" | "loading" | "unloaded", ...}`)."""
    status = entry.get("status")
    return not isinstance(status, dict) or status.get("value") in (None, "loaded")


def _openai_details(ep: EndpointInfo, entry: dict[str, Any], name: str) -> dict[str, Any]:
    status = entry.get("status")
    found: dict[str, Any] = {
        "name": name,
        "id": name,
        "original_name": name,
        "digest": "",
        "details": {},
        "endpoint": ep.url,
        "endpoint_name": ep.name,
        "status": status,
        "created": entry.get("created"),
        "owned_by": entry.get("owned_by"),
        "llama_status_args": status.get("args") if isinstance(status, dict) else None,
        "llama_status_preset": status.get("preset") if isinstance(status, dict) else None,
    }
    n_ctx = context_limits.get(ep.id, name)
    if n_ctx is not None:
        found["context_length"] = n_ctx
    return found


@methods("GET")
async def ps_details(request: HttpRequest) -> HttpResponseBase:
    """GET /api/ps_details (NOMYO Router v0.7): every loaded model on every endpoint in rotation,
    once per endpoint, as `{"models": [...]}`. An Ollama server's entries are its /api/ps entries
    plus `endpoint` (its url) and `endpoint_name`; an OpenAI-compatible server's are the models
    it lists as loaded, with NOMYO's fields: `name`, `id`, `original_name`, `digest` (""),
    `details` ({}), `endpoint`, `endpoint_name`, `status`, `created`, `owned_by`,
    `llama_status_args`, `llama_status_preset`, and `context_length` when a server told the
    router its context (routing/fleet/context_limits.py; NOMYO asks llama.cpp's /props, which
    this does not). Read from the caches (/api/ps for Ollama, the model lists for the others),
    refreshed as /api/ps and /v1/models refresh them. As those lists, only the models the
    caller's key may use."""
    may_use = principal_of(request).may_use
    endpoints = [ep for ep in await registry.enabled() if not breakers.is_open(ep.id)]
    ollama = [ep for ep in endpoints if ep.is_ollama]
    models: list[dict[str, Any]] = []
    for ep, found in zip(ollama, await candidates.gather_loaded(ollama), strict=True):
        models.extend(
            {**entry, "endpoint": ep.url, "endpoint_name": ep.name}
            for entry, name in zip(found.entries, found.names, strict=True)
            if may_use(name)
        )
    others = tuple(ep for ep in endpoints if not ep.is_ollama)
    for ep, listed in await candidates.gather_advertised(others):
        if listed is None:
            continue
        for entry, name in zip(listed.entries, listed.names, strict=True):
            if _loaded_on_openai(entry) and may_use(name):
                models.append(_openai_details(ep, entry, name))
    return JsonResponse({"models": models})


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("-")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


async def probe_version(ep: EndpointInfo) -> tuple[EndpointInfo, str | None, str | None]:
    try:
        version = await probes.fetch_version(ep)
    except probes.ProbeError as exc:
        health.mark_failing(ep, str(exc))
        return ep, None, str(exc)
    caches.versions.put(ep.id, version)
    health.mark_healthy(ep)
    return ep, version, None


# The Ollama API level the facade speaks: /api/version's answer when no Ollama server does
# (only OpenAI-compatible servers, none at all, or every Ollama server down). Clients'
# "test connection" (Open WebUI, editor plugins) calls /api/version and wants a 200 with a
# version; whether models can be served is /health's and /api/tags' business.
FACADE_VERSION = "0.12.0"


@methods("GET")
async def version(request: HttpRequest) -> HttpResponseBase:
    """{"version": the lowest among answering Ollama servers, else FACADE_VERSION}; never 503."""
    endpoints = [ep for ep in await registry.enabled() if ep.is_ollama]
    found: list[str] = []
    for ep in endpoints:
        cached = caches.versions.peek(ep.id)
        if cached is not None and not breakers.is_open(ep.id):
            found.append(cached)
    if not found:
        results = await asyncio.gather(*(probe_version(ep) for ep in endpoints))
        found = [v for _, v, _ in results if v is not None]
    return JsonResponse({"version": min(found, key=_version_tuple) if found else FACADE_VERSION})


# -- fan-out management ---------------------------------------------------------------
async def _ollama_endpoints() -> list[EndpointInfo]:
    endpoints = [ep for ep in await registry.enabled() if ep.is_ollama]
    if not endpoints:
        raise ApiError(503, "no enabled Ollama endpoint")
    return endpoints


async def _call(ep: EndpointInfo, method: str, path: str, body: bytes) -> tuple[EndpointInfo, int, bytes]:
    client = upstream_client.get_client()
    try:
        response = await client.request(
            method,
            ep.url + path,
            content=body,
            headers={"Content-Type": "application/json", **upstream_client.auth_headers(ep.api_key)},
        )
        return ep, response.status_code, response.content
    except (httpx.HTTPError, OSError) as exc:
        return ep, 502, json.dumps({"error": failures.classify(exc).value}).encode()
    finally:
        caches.advertised.invalidate(ep.id)


def _error_of(body: bytes) -> str:
    try:
        data = json.loads(body)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace")


async def _fan_out(request: HttpRequest, method: str, path: str) -> HttpResponseBase:
    endpoints = await _ollama_endpoints()
    results = await asyncio.gather(*(_call(ep, method, path, request.body) for ep in endpoints))
    if path == "/api/delete":
        # A model present on only some servers: deleting it where it is, is success.
        if all(status == 404 for _, status, _ in results):
            raise ApiError(404, _error_of(results[0][2]) or "model not found")
        results = [r for r in results if r[1] != 404]
    failed = {ep.name: f"HTTP {status}: {_error_of(body)}" for ep, status, body in results if status >= 400}
    if not failed:
        if path in ("/api/copy", "/api/delete"):
            return HttpResponse(status=200)
        return JsonResponse({"status": "success"})
    statuses = {status for _, status, _ in results if status >= 400}
    status = statuses.pop() if len(statuses) == 1 and len(failed) == len(results) else 502
    detail = "; ".join(f"{name}: {why}" for name, why in failed.items())
    raise ApiError(status, detail if len(failed) == len(results) else f"failed on some endpoints: {detail}")


async def _pull_stream(
    request: HttpRequest, path: str, endpoints: list[EndpointInfo]
) -> AsyncIterator[bytes]:
    """Progress lines of every endpoint as they come, then one verdict line."""
    queue: asyncio.Queue[tuple[EndpointInfo, bytes | None, str | None]] = asyncio.Queue()

    async def one(ep: EndpointInfo) -> None:
        error: str | None = None
        try:
            client = upstream_client.get_client()
            async with client.stream(
                "POST",
                ep.url + path,
                content=request.body,
                headers={"Content-Type": "application/json", **upstream_client.auth_headers(ep.api_key)},
            ) as response:
                if response.status_code >= 400:
                    error = f"HTTP {response.status_code}: {_error_of(await response.aread())}"
                else:
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        if '"error"' in line:
                            error = _error_of(line.encode())
                        elif '"success"' not in line:
                            await queue.put((ep, line.encode() + b"\n", None))
        except (httpx.HTTPError, OSError) as exc:
            error = failures.classify(exc).value
        finally:
            caches.advertised.invalidate(ep.id)
            await queue.put((ep, None, error))

    tasks = [asyncio.ensure_future(one(ep)) for ep in endpoints]
    errors: dict[str, str] = {}
    try:
        pending = len(tasks)
        while pending:
            ep, line, error = await queue.get()
            if line is not None:
                yield line
                continue
            pending -= 1
            if error is not None:
                errors[ep.name] = error
        if errors:
            yield json.dumps({"error": "; ".join(f"{n}: {e}" for n, e in errors.items())}).encode() + b"\n"
        else:
            yield b'{"status":"success"}\n'
    finally:
        for task in tasks:
            task.cancel()


async def _pull_like(request: HttpRequest, path: str, spec: schema.Obj) -> HttpResponseBase:
    data = parse_checked(request.body, spec)
    name = data.get("model", data.get("name"))
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "'model' is required")
    if optional_bool(data, "stream", True):
        endpoints = await _ollama_endpoints()
        return StreamingHttpResponse(
            _pull_stream(request, path, endpoints), content_type="application/x-ndjson"
        )
    return await _fan_out(request, "POST", path)


@methods("POST")
@operator_only
async def pull(request: HttpRequest) -> HttpResponseBase:
    return await _pull_like(request, "/api/pull", schema.OLLAMA_PULL)


@methods("POST")
@operator_only
async def push(request: HttpRequest) -> HttpResponseBase:
    return await _pull_like(request, "/api/push", schema.OLLAMA_PULL)


@methods("POST")
@operator_only
async def create(request: HttpRequest) -> HttpResponseBase:
    return await _pull_like(request, "/api/create", schema.OLLAMA_CREATE)


@methods("POST")
@operator_only
async def copy(request: HttpRequest) -> HttpResponseBase:
    data = parse_checked(request.body, schema.OLLAMA_COPY)
    for field in ("source", "destination"):
        if not isinstance(data.get(field), str) or not data[field].strip():
            raise ApiError(400, f"'{field}' is required")
    return await _fan_out(request, "POST", "/api/copy")


@methods("DELETE")
@operator_only
async def delete(request: HttpRequest) -> HttpResponseBase:
    data = parse_checked(request.body, schema.OLLAMA_DELETE)
    name = data.get("model", data.get("name"))
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "'model' is required")
    return await _fan_out(request, "DELETE", "/api/delete")
