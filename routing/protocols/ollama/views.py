"""Ollama's API, routed by model: chat, generate, embed, embeddings, show.

Each view checks the whole body (routing/protocols/common/schema.py) before anything is routed, so a
malformed request is a 400 and never takes a slot. A request that an OpenAI-compatible
server would have to serve with a field it cannot translate is refused the same way
(routing/protocols/translate.py `refusal`). Load and unload requests go to
routing/protocols/ollama/loading.py.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

from routing.auth.principal import principal_of
from routing.engine import attempt, proxy
from routing.engine.attempt import Attempt
from routing.fleet import candidates
from routing.fleet.candidates import Candidate
from routing.protocols import translate
from routing.protocols.common import recovery, schema
from routing.protocols.common.affinity import affinity_key
from routing.protocols.common.decorators import methods
from routing.protocols.common.parsing import optional_bool, parse_object, require_model, with_model
from routing.protocols.common.relays import OllamaStream, no_counts, ollama_body
from routing.protocols.ollama import loading

_CONVERSATIONS = frozenset({"/api/chat", "/api/generate"})


def _passthrough(
    path: str, raw: bytes, data: dict[str, Any], stream: bool, *, estimate: int = 0
) -> attempt.Planner:
    def plan(cand: Candidate) -> Attempt:
        return Attempt(
            url=cand.endpoint.url + path,
            body=with_model(raw, data, cand),
            relay=OllamaStream,
            read_body=ollama_body,
            stream=stream,
            estimate=estimate,
        )

    return plan


class _Routed:
    """The planner of a routed Ollama request: Ollama endpoints get the request untouched,
    OpenAI-compatible ones a translation. `translated` tells whether the last attempt (the
    one whose reply the client gets) went to an OpenAI-compatible server."""

    def __init__(
        self, path: str, raw: bytes, data: dict[str, Any], stream: bool, *, estimate: int = 0
    ) -> None:
        self.path, self.data, self.stream = path, data, stream
        self.direct = _passthrough(path, raw, data, stream, estimate=estimate)
        self.translated = False

    def __call__(self, cand: Candidate) -> Attempt:
        self.translated = not cand.endpoint.is_ollama
        if not self.translated:
            planned = self.direct(cand)
        else:
            planned = translate.plan_for_openai_backend(self.path, self.data, self.stream, cand)
        if self.path in _CONVERSATIONS:  # a prompt too long, images the model cannot see
            return recovery.guard(planned, cand)
        return planned


async def _forward(
    request: HttpRequest, plan: _Routed, model: str, affinity: str | None = None
) -> HttpResponseBase:
    """Forward, and name the load-time options an OpenAI-compatible server did not get
    (`X-Router-Ignored: num_ctx,num_gpu`; translate.SERVER_OPTIONS) on its reply.
    affinity: the conversation's key (routing/protocols/common/affinity.py), None: none."""
    response = await proxy.forward(
        request.path, model=model, plan=plan, principal=principal_of(request), affinity=affinity
    )
    ignored = translate.ignored_options(plan.data) if plan.translated else ""
    if ignored:
        response[translate.IGNORED_HEADER] = ignored
    return response


def _checked(request: HttpRequest, spec: schema.Obj) -> tuple[dict[str, Any], str]:
    data = parse_object(request.body)
    model = require_model(data)
    schema.check(spec, data)
    return data, model


async def _refuse_untranslatable(path: str, model: str, data: dict[str, Any]) -> None:
    """Raise the translation's 400 when an OpenAI-compatible server may serve the request.
    The lookup runs only when some field cannot be translated (rare), from warm caches."""
    refused = translate.refusal(path, data)
    if refused is None:
        return
    lookup = await candidates.candidates_for(model)
    if any(not c.endpoint.is_ollama for c in lookup.candidates):
        raise refused


async def _generation(request: HttpRequest, path: str, spec: schema.Obj) -> HttpResponseBase:
    data, model = _checked(request, spec)
    stream = optional_bool(data, "stream", True)
    if loading.is_load_request(path, data):
        return await loading.load_or_unload(path, model, request.body, data, stream, principal_of(request))
    await _refuse_untranslatable(path, model, data)
    affinity = affinity_key(request, data, path) if settings.ROUTER_AFFINITY else None
    return await _forward(request, _Routed(path, request.body, data, stream), model, affinity)


@methods("POST")
async def chat(request: HttpRequest) -> HttpResponseBase:
    return await _generation(request, "/api/chat", schema.OLLAMA_CHAT)


@methods("POST")
async def generate(request: HttpRequest) -> HttpResponseBase:
    return await _generation(request, "/api/generate", schema.OLLAMA_GENERATE)


@methods("POST")
async def embed(request: HttpRequest) -> HttpResponseBase:
    data, model = _checked(request, schema.OLLAMA_EMBED)
    await _refuse_untranslatable("/api/embed", model, data)
    return await _forward(request, _Routed("/api/embed", request.body, data, False), model)


@methods("POST")
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    """The legacy embeddings route. An Ollama server's reply carries no counts: the request is
    recorded without tokens, and a client key is charged the prompt's length / 4 (about one
    token per 4 characters); an OpenAI-compatible server's reply carries usage, which is counted."""
    data, model = _checked(request, schema.OLLAMA_EMBEDDINGS)
    await _refuse_untranslatable("/api/embeddings", model, data)
    prompt = data.get("prompt")
    estimate = (len(prompt) + 3) // 4 if isinstance(prompt, str) else 0
    plan = _Routed("/api/embeddings", request.body, data, False, estimate=estimate)
    return await _forward(request, plan, model)


@methods("POST")
async def show(request: HttpRequest) -> HttpResponseBase:
    data = parse_object(request.body)
    model = require_model(data, alt="name")
    schema.check(schema.OLLAMA_SHOW, data)

    field = "model" if isinstance(data.get("model"), str) else "name"

    def plan(cand: Candidate) -> Attempt:
        if cand.endpoint.is_ollama:
            return Attempt(
                url=cand.endpoint.url + "/api/show",
                body=with_model(request.body, data, cand, field),
                relay=OllamaStream,
                read_body=no_counts,
                stream=False,
            )
        return translate.show_for_openai_backend(cand)

    return await proxy.forward(
        request.path, model=model, plan=plan, principal=principal_of(request), metered=False
    )
