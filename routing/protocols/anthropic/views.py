"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens.

Same selection, slots, queue, failover and accounting as every routed request
(engine/proxy.forward): the body is checked whole first (shapes.py: a 400 in Anthropic's shape,
no slot taken), then each candidate gets the request translated for its kind (convert.py):
an OpenAI-compatible server its /chat/completions (streamed with `stream_options.include_usage`,
re-sent without it to a server that refuses it), an Ollama server its /api/chat. Replies come
back as Anthropic's (replies.py, events.py), counted from the server's own usage. A
conversation too long for the server's context is trimmed and images a model cannot see are
dropped, as on the other chat routes (common/recovery.py: `X-Router-Trimmed`,
`X-Router-Images-Dropped`). Turns of one conversation go to the server that holds its prefix
in cache (prompt-cache affinity, keyed by `X-Session-Id`, `metadata.user_id` or the system
prompt and opening messages: common/affinity.py).

Headers: `x-api-key` is a key like `Authorization: Bearer` (routing/auth/keys.py);
`anthropic-version` and `anthropic-beta` are accepted and not needed (one API version is
spoken; absent is fine). Fields and choices an upstream could not honour are named in
`X-Router-Ignored`. Thinking the server produced is left out of the reply when the request
switched it off (`thinking.type: disabled`) or asked not to see it (`display: omitted`).

count_tokens: neither server kind counts without running the model (Ollama has no tokenizer
route; llama.cpp's /tokenize takes a rendered prompt, vLLM's its own shape), so the request,
rendered by the server's own chat template with the tools, is sent as a generation of one
token and the prompt count the server reports is the answer: exact for what that server
evaluates. It takes a slot and is accounted like any request (the server did the prompt's
work). Ollama reports fewer prompt tokens when part of the prompt was cached from a previous
request, and the answer is then lower.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

from routing.auth.principal import principal_of
from routing.engine import proxy
from routing.engine.attempt import Attempt
from routing.fleet.candidates import Candidate
from routing.protocols.anthropic import convert, replies, shapes
from routing.protocols.anthropic.events import FromOllama, FromOpenAI
from routing.protocols.common import recovery
from routing.protocols.common.affinity import affinity_key
from routing.protocols.common.decorators import methods
from routing.protocols.common.parsing import optional_bool, parse_object, require_model

IGNORED_HEADER = "X-Router-Ignored"


class _Planner:
    """Builds, per candidate, the upstream request; remembers what the last one (the one whose
    reply the client gets) could not honour."""

    def __init__(self, data: dict[str, Any], *, stream: bool, count: bool) -> None:
        self.data = data
        self.stream = stream
        self.count = count
        self.model = str(data["model"])
        thinking = data.get("thinking") or {}
        self.keep_thinking = thinking.get("type") != "disabled" and thinking.get("display") != "omitted"
        self.stops = list(data.get("stop_sequences") or ())
        self.ignored: list[str] = []

    def __call__(self, cand: Candidate) -> Attempt:
        limit = 1 if self.count else None
        if cand.endpoint.is_ollama:
            self.ignored = convert.ollama_ignored(self.data)
            if self.count:
                self.ignored = []
            body = convert.ollama_request(self.data, cand.backend_model, stream=self.stream, max_tokens=limit)
            attempt = Attempt(
                url=cand.endpoint.url + "/api/chat",
                body=json.dumps(body).encode(),
                relay=lambda: FromOllama(self.model, keep_thinking=self.keep_thinking),
                read_body=replies.count_from_ollama
                if self.count
                else replies.from_ollama(self.model, keep_thinking=self.keep_thinking),
                stream=self.stream,
            )
            return self._guarded(attempt, cand)
        self.ignored = []
        request = convert.openai_request(self.data, cand.backend_model, stream=self.stream, max_tokens=limit)

        def without_stream_options() -> bytes:  # for a server that refuses the field (proxy.forward)
            return json.dumps({k: v for k, v in request.items() if k != "stream_options"}).encode()

        attempt = Attempt(
            url=cand.endpoint.openai_base + "/chat/completions",
            body=json.dumps(request).encode(),
            relay=lambda: FromOpenAI(self.model, self.stops, keep_thinking=self.keep_thinking),
            read_body=replies.count_from_openai
            if self.count
            else replies.from_openai(self.model, self.stops, keep_thinking=self.keep_thinking),
            stream=self.stream,
            fallback_body=without_stream_options if self.stream else None,
        )
        return self._guarded(attempt, cand)

    def _guarded(self, attempt: Attempt, cand: Candidate) -> Attempt:
        """The attempt, with the chat routes' recovery (a conversation too long for the
        server's context trimmed, images a model cannot see dropped: common/recovery.py) on
        /v1/messages; count_tokens gets the server's refusal as is (trimming would count a
        different conversation)."""
        return attempt if self.count else recovery.guard(attempt, cand)


async def _route(request: HttpRequest, data: dict[str, Any], plan: _Planner) -> HttpResponseBase:
    # Prompt-cache affinity for generations (count_tokens is a one-token request whose count
    # Ollama lowers by what it has cached: it is placed without affinity).
    keyed = not plan.count and settings.ROUTER_AFFINITY
    response = await proxy.forward(
        request.path,
        model=plan.model,
        plan=plan,
        principal=principal_of(request),
        affinity=affinity_key(request, data, "/v1/messages") if keyed else None,
    )
    ignored = ",".join(filter(None, [shapes.ignored_fields(data), *plan.ignored]))
    if ignored:
        response[IGNORED_HEADER] = ignored
    return response


@methods("POST")
async def messages(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/messages: a Message, whole or streamed as Anthropic's events.
    Raises ApiError 400 (malformed or untranslatable body), and what forward raises."""
    data = parse_object(request.body)
    require_model(data)
    shapes.check_messages(data)
    stream = optional_bool(data, "stream", False)
    return await _route(request, data, _Planner(data, stream=stream, count=False))


@methods("POST")
async def count_tokens(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/messages/count_tokens: {"input_tokens": n} (the module docstring says how)."""
    data = parse_object(request.body)
    require_model(data)
    shapes.check_count(data)
    return await _route(request, data, _Planner(data, stream=False, count=True))
