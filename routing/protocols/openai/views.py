"""The OpenAI-compatible API: chat completions, completions, embeddings, models.

Same selection, queue, limits, failover and counting as the Ollama routes (proxy.forward).
Ollama endpoints are reached at their /v1 routes, OpenAI-compatible ones at their url.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from routing.auth.principal import principal_of
from routing.core.errors import ApiError
from routing.core.names import model_key
from routing.engine import attempt, proxy
from routing.engine.attempt import Attempt
from routing.fleet import candidates
from routing.fleet.candidates import Candidate
from routing.fleet.registry import registry
from routing.protocols.common import recovery, schema
from routing.protocols.common.affinity import affinity_key
from routing.protocols.common.decorators import methods
from routing.protocols.common.parsing import optional_bool, parse_object, require_model
from routing.protocols.common.relays import OpenAIStream, openai_body


def _plan(suffix: str, raw: bytes, data: dict[str, Any], stream: bool) -> attempt.Planner:
    strip_usage = False
    body = data
    if stream and suffix != "/embeddings":
        options = data.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            # The router needs the usage numbers; the client did not ask for them, so
            # they are requested here and the usage-only chunk is removed on the way back.
            body = {**data, "stream_options": {**(options or {}), "include_usage": True}}
            strip_usage = True
    cache: dict[str, bytes] = {}
    if body is data:
        cache[data["model"]] = raw  # untouched
    elif "stream_options" not in data:
        # Appended to the client's own bytes (a JSON object: its last character is "}")
        # rather than re-serialising a conversation that may be long.
        cache[data["model"]] = raw.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'

    def plan(cand: Candidate) -> Attempt:
        name = cand.backend_model
        payload = cache.get(name)
        if payload is None:
            payload = cache[name] = json.dumps({**body, "model": name}).encode()
        fallback = None
        if strip_usage:  # the client's own request, for a server that refuses the added field

            def fallback() -> bytes:
                return raw if name == data["model"] else json.dumps({**data, "model": name}).encode()

        planned = Attempt(
            url=cand.endpoint.openai_base + suffix,
            body=payload,
            relay=lambda: OpenAIStream(strip_usage=strip_usage),
            read_body=openai_body,
            stream=stream,
            fallback_body=fallback,
        )
        return recovery.guard(planned, cand) if suffix == "/chat/completions" else planned

    return plan


async def _route(request: HttpRequest, suffix: str, spec: schema.Obj) -> HttpResponseBase:
    """Check the whole body (routing/protocols/common/schema.py) before routing: a malformed one is a 400
    and takes no slot."""
    data = parse_object(request.body)
    model = require_model(data)
    schema.check(spec, data)
    generation = suffix != "/embeddings"
    stream = optional_bool(data, "stream", False) if generation else False
    keyed = generation and settings.ROUTER_AFFINITY
    affinity = affinity_key(request, data, "/v1" + suffix) if keyed else None
    return await proxy.forward(
        request.path,
        model=model,
        plan=_plan(suffix, request.body, data, stream),
        principal=principal_of(request),
        affinity=affinity,
    )


@methods("POST")
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    return await _route(request, "/chat/completions", schema.OPENAI_CHAT)


@methods("POST")
async def completions(request: HttpRequest) -> HttpResponseBase:
    return await _route(request, "/completions", schema.OPENAI_COMPLETIONS)


@methods("POST")
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    return await _route(request, "/embeddings", schema.OPENAI_EMBEDDINGS)


async def _model_objects(request: HttpRequest) -> list[dict[str, Any]]:
    """Every model the enabled endpoints advertise, once each (by `model_key`), and the aliases
    that can be served (routing/fleet/candidates.py `listing`), as OpenAI's model object:
    {"id", "object": "model", "created", "owned_by"} (OpenAI API reference, Models); only those
    the caller's key may use (all for the operator and an open router; an alias by its
    targets, routing/fleet/routes.py)."""
    principal, routes = principal_of(request), await registry.routes()
    data: list[dict[str, Any]] = []
    for item in await candidates.listing():
        if not routes.may_use(principal, item.name):
            continue
        ep, entry = item.endpoint, item.entry
        data.append(
            {
                "id": item.name,
                "object": "model",
                "created": entry.get("created", 0) if not ep.is_ollama else 0,
                "owned_by": entry.get("owned_by", "library") if not ep.is_ollama else "library",
            }
        )
    return data


@methods("GET")
async def models(request: HttpRequest) -> HttpResponseBase:
    return JsonResponse({"object": "list", "data": await _model_objects(request)})


@methods("GET")
async def model(request: HttpRequest, model_id: str) -> HttpResponseBase:
    """GET /v1/models/{model_id}: one model object, matched in any spelling the lists show
    (`llama3` is `llama3:latest`; ids may hold '/' and ':'). Raises ApiError 404 with code
    `model_not_found` (OpenAI's code for an unknown model) when no enabled endpoint has it, or
    the caller's key may not use it (as OpenAI answers for a model the account cannot see)."""
    wanted = model_key(model_id)
    for found in await _model_objects(request):
        if model_key(found["id"]) == wanted:
            return JsonResponse(found)
    raise ApiError(404, f"The model '{model_id}' does not exist", code="model_not_found")
