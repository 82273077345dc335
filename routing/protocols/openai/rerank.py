"""Rerank: `POST /v1/rerank` and `POST /rerank`, in the Jina / Cohere shape that llama.cpp's
server (started with `--reranking`) and vLLM serve at `/v1/rerank`.

Request: `model`, `query` (a string, or Jina's `{"text": ...}`), `documents` (strings or
objects with `text`, at least one), optional `top_n` (>= 1), `return_documents`,
`max_tokens_per_doc`. Checked whole before routing (a 400, no slot taken). The upstream gets
the documents as plain strings (what llama.cpp takes), `top_n` and `max_tokens_per_doc`.

Reply: `{"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}...],
"usage": {"prompt_tokens", "total_tokens"}, "meta": {"billed_units": {"search_units",
"input_tokens"}}}`: results sorted by score (highest first), at most `top_n`; `document` only
with `return_documents: true`; `usage` (Jina's shape, llama.cpp's) and `meta` (Cohere's) only
when the server reported its tokens, which are then counted as input tokens.

Routing: by model, through proxy.forward (slots, queue, failover, accounting), to the
OpenAI-compatible endpoints serving it. Ollama has no rerank API: a model only Ollama servers
have is a 501, and so is one whose every server refused reranking (404 or 501 from a server
not started with `--reranking`, or whose model is no reranker); such a refusal is remembered
per endpoint and model (routing/fleet/refusals.py) and those servers are passed over until it
expires. An unknown model is a 404. Errors are in OpenAI's shape on both paths.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponseBase

from routing.auth.principal import principal_of
from routing.core.errors import ApiError
from routing.core.names import model_key
from routing.engine import attempt, proxy
from routing.engine.accounting import Counts
from routing.engine.attempt import Attempt, Refuse
from routing.fleet.candidates import Candidate
from routing.fleet.refusals import rerank_refusals
from routing.protocols.common import schema
from routing.protocols.common.decorators import methods
from routing.protocols.common.parsing import optional_bool, parse_object, require_model
from routing.protocols.common.relays import OpenAIStream

TEXT = schema.Obj(
    {"text": schema.STR}, required=frozenset({"text"}), what="a string or an object with 'text'"
)
RERANK = schema.Obj(
    {
        "model": schema.STR,
        "query": schema.AnyOf((schema.STR, TEXT), what="a string or an object with 'text'"),
        "documents": schema.ListOf(
            schema.AnyOf((schema.STR, TEXT), what="a string or an object with 'text'"),
            what="a non-empty list of strings or objects with 'text'",
            nonempty=True,
        ),
        "top_n": schema.Int(what="a positive integer", minimum=1),
        "return_documents": schema.BOOL,
        "max_tokens_per_doc": schema.Int(what="a positive integer", minimum=1),
    },
    required=frozenset({"query", "documents"}),
)
REFUSED_STATUSES = frozenset({404, 501})


def _text(value: str | dict[str, Any]) -> str:
    return value if isinstance(value, str) else str(value["text"])


def not_served(model: str) -> ApiError:
    """The 501 (code `rerank_not_supported`) for a model no candidate serves reranking for."""
    return ApiError(
        501,
        f"no server serves reranking for model '{model}' (Ollama has no rerank API; a llama.cpp "
        "server needs --reranking)",
        code="rerank_not_supported",
    )


def reply_body(
    upstream: bytes, *, model: str, documents: list[str], top_n: int | None, return_documents: bool
) -> tuple[bytes, Counts | None]:
    """The client's reply from the server's (see the module docstring) and its counts.
    Raises ValueError (a malformed reply: the engine answers 502) when the results are not a
    list of {index in range, relevance_score (or TEI's score) a number}."""
    data = json.loads(upstream)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError("no results list")
    results: list[dict[str, Any]] = []
    for entry in data["results"]:
        index = entry.get("index") if isinstance(entry, dict) else None
        score = entry.get("relevance_score", entry.get("score")) if isinstance(entry, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(documents):
            raise ValueError("result index out of range")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise ValueError("result score is not a number")
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if return_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    results.sort(key=lambda r: -r["relevance_score"])
    if top_n is not None:
        results = results[:top_n]
    reply: dict[str, Any] = {"id": str(data.get("id") or f"rerank-{uuid.uuid4().hex}"), "model": model}
    reply["results"] = results
    usage = data.get("usage")
    tokens = None
    if isinstance(usage, dict):
        tokens = usage.get("prompt_tokens") or usage.get("total_tokens")
    counts = None
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        counts = Counts(prompt=tokens, completion=0)
        reply["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        reply["meta"] = {
            "billed_units": {"search_units": max(1, math.ceil(len(documents) / 100)), "input_tokens": tokens}
        }
    return json.dumps(reply).encode(), counts


def _accept(model: str) -> Callable[[Candidate], ApiError | None]:
    key = model_key(model)

    def accept(cand: Candidate) -> ApiError | None:
        if cand.endpoint.is_ollama or rerank_refusals.refuses(cand.endpoint.id, key):
            return not_served(model)
        return None

    return accept


def _planner(model: str, data: dict[str, Any]) -> attempt.Planner:
    documents = [_text(d) for d in data["documents"]]
    top_n = data.get("top_n")
    return_documents = optional_bool(data, "return_documents", False)
    upstream: dict[str, Any] = {"query": _text(data["query"]), "documents": documents}
    for name in ("top_n", "max_tokens_per_doc"):
        if data.get(name) is not None:
            upstream[name] = data[name]
    key = model_key(model)

    def read(body: bytes) -> tuple[bytes, Counts | None]:
        return reply_body(
            body, model=model, documents=documents, top_n=top_n, return_documents=return_documents
        )

    def plan(cand: Candidate) -> Attempt:
        def refused(_: Attempt, status: int, body: bytes) -> Refuse | None:
            if status not in REFUSED_STATUSES:
                return None
            rerank_refusals.add(cand.endpoint.id, key)
            return Refuse(not_served(model))

        return Attempt(
            url=cand.endpoint.openai_base + "/rerank",
            body=json.dumps({"model": cand.backend_model, **upstream}).encode(),
            relay=lambda: OpenAIStream(strip_usage=False),  # never used: rerank does not stream
            read_body=read,
            stream=False,
            recover=refused,
        )

    return plan


@methods("POST")
async def rerank(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/rerank and /rerank: the reply of the module docstring. Raises ApiError 400 (a
    malformed body, before any slot is taken), 404 (no server has the model), 501 (none serves
    reranking for it), 502 (a reply that is not a rerank result), and what forward raises."""
    data = parse_object(request.body)
    model = require_model(data)
    schema.check(RERANK, data)
    return await proxy.forward(
        request.path,
        model=model,
        plan=_planner(model, data),
        principal=principal_of(request),
        accept=_accept(model),
    )
