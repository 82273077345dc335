"""Ollama's API, routed by model: chat, generate, embed, embeddings, show."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponseBase

from routing import proxy, translate
from routing.board import Candidate
from routing.decorators import methods
from routing.parsing import expect_types, optional_bool, parse_object, require_model
from routing.proxy import Attempt
from routing.relays import OllamaStream, no_counts, ollama_body


def _passthrough(path: str, raw: bytes, stream: bool, *, counted: bool = True) -> proxy.Planner:
    def plan(cand: Candidate) -> Attempt:
        return Attempt(
            url=cand.endpoint.url + path,
            body=raw,
            relay=OllamaStream,
            read_body=ollama_body if counted else no_counts,
            stream=stream,
            counted=counted,
        )

    return plan


def _routed(path: str, raw: bytes, data: dict[str, Any], stream: bool) -> proxy.Planner:
    """Ollama endpoints get the request untouched; OpenAI-compatible ones get a translation."""
    direct = _passthrough(path, raw, stream)

    def plan(cand: Candidate) -> Attempt:
        if cand.endpoint.is_ollama:
            return direct(cand)
        return translate.plan_for_openai_backend(path, data, stream, cand)

    return plan


@methods("POST")
async def chat(request: HttpRequest) -> HttpResponseBase:
    data = parse_object(request.body)
    model = require_model(data)
    expect_types(data, messages=list, tools=list, options=dict, format=(str, dict))
    stream = optional_bool(data, "stream", True)
    return await proxy.forward(
        request.path, model=model, plan=_routed("/api/chat", request.body, data, stream)
    )


@methods("POST")
async def generate(request: HttpRequest) -> HttpResponseBase:
    data = parse_object(request.body)
    model = require_model(data)
    expect_types(data, prompt=str, system=str, images=list, options=dict, format=(str, dict))
    stream = optional_bool(data, "stream", True)
    return await proxy.forward(
        request.path, model=model, plan=_routed("/api/generate", request.body, data, stream)
    )


@methods("POST")
async def embed(request: HttpRequest) -> HttpResponseBase:
    data = parse_object(request.body)
    model = require_model(data)
    expect_types(data, input=(str, list), options=dict)
    return await proxy.forward(
        request.path, model=model, plan=_routed("/api/embed", request.body, data, False)
    )


@methods("POST")
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    """The legacy embeddings route. An Ollama server's reply carries no counts (nothing is
    recorded for it); an OpenAI-compatible server's carries usage, which is counted."""
    data = parse_object(request.body)
    model = require_model(data)
    expect_types(data, prompt=str, options=dict)
    direct = _passthrough("/api/embeddings", request.body, False, counted=False)

    def plan(cand: Candidate) -> Attempt:
        if cand.endpoint.is_ollama:
            return direct(cand)
        return translate.plan_for_openai_backend("/api/embeddings", data, False, cand)

    return await proxy.forward(request.path, model=model, plan=plan)


@methods("POST")
async def show(request: HttpRequest) -> HttpResponseBase:
    data = parse_object(request.body)
    model = require_model(data, alt="name")

    def plan(cand: Candidate) -> Attempt:
        if cand.endpoint.is_ollama:
            return Attempt(
                url=cand.endpoint.url + "/api/show",
                body=request.body,
                relay=OllamaStream,
                read_body=no_counts,
                stream=False,
            )
        return translate.show_for_openai_backend(cand)

    return await proxy.forward(request.path, model=model, plan=plan, metered=False)
