"""Ollama's load and unload requests, answered for the whole fleet.

Ollama (docs/api.md, "Load a model" / "Unload a model"): /api/generate with an empty
prompt, or /api/chat with no messages, loads the model and generates nothing; with
`keep_alive` 0 it unloads it. The reply is one object, `done: true` with `done_reason`
"load" or "unload" and an empty `response` / `message`.

Here such a request goes, as the client sent it, to every enabled Ollama server that has
the model (not to one chosen server: a model loaded on two servers is unloaded from both),
and the loaded-models cache of each is dropped so /api/ps shows the change at once.
An unload takes the model away from every client: the operator's alone (403 for a client
key). A load is what any request for the model does first: a client key may ask for it for a
model it may use.
OpenAI-compatible servers cannot load or unload on request; they are not contacted. The
request takes no slot (it generates nothing) and records no tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from django.conf import settings
from django.http import HttpResponse

from routing.auth.principal import Principal
from routing.core.errors import ApiError
from routing.fleet import caches, candidates
from routing.fleet.candidates import Candidate
from routing.fleet.registry import registry
from routing.protocols.common.decorators import refuse_unless_operator
from routing.protocols.common.parsing import with_model
from routing.protocols.translate import now
from routing.upstream import client, failures
from routing.upstream.failures import UPSTREAM_ERRORS

# A Go duration of zero ("0", "0s", "0.0m", ...), as Ollama parses keep_alive strings.
_ZERO_DURATION = re.compile(r"(?:0+(?:\.0*)?|\.0+)(?:ns|us|µs|ms|s|m|h)?")


def is_load_request(path: str, data: dict[str, Any]) -> bool:
    """Nothing to generate: /api/chat without messages, /api/generate without a prompt."""
    if path == "/api/chat":
        return not data.get("messages")
    return not data.get("prompt")


def is_unload(data: dict[str, Any]) -> bool:
    value = data.get("keep_alive")
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == 0
    return isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip()) is not None


async def _send(cand: Candidate, path: str, body: bytes) -> str | None:
    """None when the server did it, else why not."""
    ep = cand.endpoint
    try:
        async with client.get_session().post(
            ep.url + path,
            data=body,
            headers={"Content-Type": "application/json", **client.auth_headers(ep.api_key)},
            timeout=client.proxy_timeout(),
            allow_redirects=False,
        ) as response:
            async with asyncio.timeout(settings.ROUTER_READ_TIMEOUT):
                text = await response.read()
            status = response.status
    except UPSTREAM_ERRORS as exc:
        return failures.classify(exc).value
    finally:
        caches.loaded.invalidate(ep.id)
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        last = json.loads(lines[-1]) if lines else None
    except (ValueError, RecursionError):
        last = None
    if isinstance(last, dict) and last.get("error"):
        return f"HTTP {status}: {str(last['error'])[:200]}"
    if status != 200:
        return f"HTTP {status}"
    return None


def reply(path: str, model: str, *, unload: bool, stream: bool) -> HttpResponse:
    """Ollama's load/unload reply: NDJSON (one line) when streamed, else one JSON object."""
    body: dict[str, Any] = {"model": model, "created_at": now()}
    if path == "/api/chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body["done_reason"] = "unload" if unload else "load"
    body["done"] = True
    data = json.dumps(body).encode()
    if stream:
        return HttpResponse(data + b"\n", content_type="application/x-ndjson")
    return HttpResponse(data, content_type="application/json")


async def load_or_unload(
    path: str, model: str, body: bytes, data: dict[str, Any], stream: bool, principal: Principal
) -> HttpResponse:
    """Answer a load/unload request (see the module docstring) for `principal`. Errors: 403 when
    a client key asks for an unload (operator only) or a load of a model it may not use; 404/503
    as for any routed request when no server has the model; 502 naming the servers that failed."""
    if is_unload(data):
        refuse_unless_operator(principal, "unloading a model")
    else:
        (await registry.routes()).require(principal, model)
    lookup = await candidates.candidates_for(model)
    lookup = candidates.usable_by(lookup, principal)
    if not lookup.candidates:
        if lookup.failing_with_model:
            raise ApiError(503, f"every endpoint serving '{model}' is failing; try again", retry_after=5)
        if lookup.reachable == 0:
            raise ApiError(503, "no endpoint is reachable", retry_after=5)
        raise ApiError(404, f"model '{model}' not found", code="model_not_found")
    ollama = [c for c in lookup.candidates if c.endpoint.is_ollama]
    results = await asyncio.gather(*(_send(c, path, with_model(body, data, c)) for c in ollama))
    failed = {c.endpoint.name: why for c, why in zip(ollama, results, strict=True) if why is not None}
    if failed:
        detail = "; ".join(f"{name}: {why}" for name, why in failed.items())
        prefix = "" if len(failed) == len(ollama) else "failed on some endpoints: "
        raise ApiError(502, f"{prefix}{detail}", retry_after=5)
    response = reply(path, model, unload=is_unload(data), stream=stream)
    if ollama:
        response["X-Router-Endpoint"] = ",".join(c.endpoint.name for c in ollama)
    return response
