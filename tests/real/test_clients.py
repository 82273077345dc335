"""The official `openai` and `ollama` clients through the router, to a real llama.cpp server.

Every reply is checked against what llama-server itself answers to the same request sent
directly (temperature 0, a fixed seed: the same tokens and the same usage), and the router's
token totals against the usage the server reported.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.real.conftest import Real
from tests.real.llama import ALIAS
from tests.reliability.support import Totals, wait_db_totals

PROMPT = "Name three colours."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 12
SAMPLING: dict[str, Any] = {"temperature": 0, "seed": 1, "max_tokens": MAX_TOKENS}
EMBEDDING_SIZE = 640  # Gemma 3 270M's hidden size


def direct(real: Real, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same request sent straight to llama-server A, not through the router."""
    reply = httpx.post(real.llamas[0].v1 + path, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def token_counts(real: Real) -> dict[str, int]:
    """The router's all-time totals for llama-server A, from its stats route /api/token_counts."""
    rows = httpx.get(real.url + "/api/token_counts", timeout=10).json()["breakdown"]
    mine = [r for r in rows if r["endpoint"] == real.llamas[0].v1]
    return {
        key: sum(r[key] for r in mine)
        for key in ("input_tokens", "output_tokens", "total_tokens", "requests")
    }


@pytest.fixture
def real(real_router) -> Real:
    return real_router()


@pytest.fixture
def oai(real: Real) -> openai.OpenAI:
    return openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def oll(real: Real) -> ollama.Client:
    return ollama.Client(host=real.url, timeout=60)


def test_the_model_list_shows_the_servers_model_on_both_apis(real, oai, oll):
    served = httpx.get(real.llamas[0].v1 + "/models", timeout=10).json()
    assert [m["id"] for m in served["data"]] == [ALIAS]
    assert [m.id for m in oai.models.list()] == [ALIAS]
    assert ALIAS in [m.model for m in oll.list().models]


def test_openai_chat_whole_and_streamed_match_the_server(real, oai):
    expected = direct(real, "/chat/completions", {"model": ALIAS, "messages": MESSAGES, **SAMPLING})
    whole = oai.chat.completions.create(model=ALIAS, messages=MESSAGES, **SAMPLING)
    assert whole.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"],
        expected["usage"]["completion_tokens"],
    )

    chunks = list(
        oai.chat.completions.create(
            model=ALIAS,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            **SAMPLING,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    # The router asked the server for usage itself; a client that did not ask gets none.
    plain = list(oai.chat.completions.create(model=ALIAS, messages=MESSAGES, stream=True, **SAMPLING))
    assert plain and all(c.usage is None and c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text


def test_openai_completions_and_embeddings_match_the_server(real, oai):
    expected = direct(real, "/completions", {"model": ALIAS, "prompt": PROMPT, **SAMPLING})
    completion = oai.completions.create(model=ALIAS, prompt=PROMPT, **SAMPLING)
    assert completion.choices[0].text == expected["choices"][0]["text"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"] <= MAX_TOKENS

    inputs = ["the sky is blue", "grass is green"]
    served = direct(real, "/embeddings", {"model": ALIAS, "input": inputs})
    embedded = oai.embeddings.create(model=ALIAS, input=inputs)
    assert [len(d.embedding) for d in embedded.data] == [EMBEDDING_SIZE, EMBEDDING_SIZE]
    for mine, theirs in zip(embedded.data, served["data"], strict=True):
        assert mine.embedding == pytest.approx(theirs["embedding"], abs=1e-4)
    assert embedded.usage.prompt_tokens == served["usage"]["prompt_tokens"] > 0


def test_ollama_chat_whole_and_streamed_match_the_server(real, oll):
    expected = direct(real, "/chat/completions", {"model": ALIAS, "messages": MESSAGES, **SAMPLING})
    options = {"temperature": 0, "seed": 1, "num_predict": MAX_TOKENS}
    whole = oll.chat(model=ALIAS, messages=MESSAGES, options=options)
    assert whole.done and whole.message.role == "assistant"
    assert whole.message.content == expected["choices"][0]["message"]["content"]
    assert whole.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert whole.eval_count == expected["usage"]["completion_tokens"]

    chunks = list(oll.chat(model=ALIAS, messages=MESSAGES, options=options, stream=True))
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content
    assert (chunks[-1].prompt_eval_count, chunks[-1].eval_count) == (
        whole.prompt_eval_count,
        whole.eval_count,
    )


def test_ollama_generate_and_embed_on_the_openai_server(real, oll):
    options = {"temperature": 0, "seed": 1, "num_predict": MAX_TOKENS}
    generated = oll.generate(model=ALIAS, prompt=PROMPT, options=options)
    assert generated.done and generated.response
    assert generated.prompt_eval_count and 0 < (generated.eval_count or 0) <= MAX_TOKENS
    streamed = list(oll.generate(model=ALIAS, prompt=PROMPT, options=options, stream=True))
    assert streamed[-1].done and "".join(c.response for c in streamed) == generated.response
    assert (streamed[-1].prompt_eval_count, streamed[-1].eval_count) == (
        generated.prompt_eval_count,
        generated.eval_count,
    )

    served = direct(real, "/embeddings", {"model": ALIAS, "input": ["hello world", "good night"]})
    embedded = oll.embed(model=ALIAS, input=["hello world", "good night"])
    assert len(embedded.embeddings) == 2
    for mine, theirs in zip(embedded.embeddings, served["data"], strict=True):
        assert len(mine) == EMBEDDING_SIZE
        # Ollama answers normalised vectors; the direction must be the server's.
        norm = sum(x * x for x in theirs["embedding"]) ** 0.5
        unit = [x / norm for x in theirs["embedding"]] if norm else theirs["embedding"]
        assert sum(a * b for a, b in zip(mine, unit, strict=True)) == pytest.approx(
            sum(a * a for a in mine) ** 0.5, rel=1e-3
        )
    assert embedded.prompt_eval_count == served["usage"]["prompt_tokens"]


def test_the_router_counts_exactly_the_tokens_the_server_reported(real, oai, oll):
    """Each request's usage as the server reported it to the client, summed, is what the
    router's stats route and its database hold: every request once, streamed ones included."""
    seen_in = seen_out = 0

    def add(prompt: int | None, completion: int | None) -> None:
        nonlocal seen_in, seen_out
        assert prompt and completion is not None
        seen_in, seen_out = seen_in + prompt, seen_out + completion

    reply = oai.chat.completions.create(model=ALIAS, messages=MESSAGES, **SAMPLING)
    assert reply.usage is not None
    add(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    last = list(
        oai.chat.completions.create(
            model=ALIAS, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **SAMPLING
        )
    )[-1]
    assert last.usage is not None
    add(last.usage.prompt_tokens, last.usage.completion_tokens)
    completion = oai.completions.create(model=ALIAS, prompt=PROMPT, **SAMPLING)
    assert completion.usage is not None
    add(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    options = {"temperature": 0, "seed": 1, "num_predict": MAX_TOKENS}
    chat = oll.chat(model=ALIAS, messages=MESSAGES, options=options)
    add(chat.prompt_eval_count, chat.eval_count)
    end = list(oll.chat(model=ALIAS, messages=MESSAGES, options=options, stream=True))[-1]
    add(end.prompt_eval_count, end.eval_count)
    generated = oll.generate(model=ALIAS, prompt=PROMPT, options=options)
    add(generated.prompt_eval_count, generated.eval_count)
    requests = 6

    # A streamed request whose client did not ask for usage still counts, with the tokens
    # the server reported to the router (the same as a client asking would be told).
    quiet = list(oai.chat.completions.create(model=ALIAS, messages=MESSAGES, stream=True, **SAMPLING))
    assert quiet
    add(last.usage.prompt_tokens, last.usage.completion_tokens)
    requests += 1
    embedded = oai.embeddings.create(model=ALIAS, input=["count me", "and me"])
    add(embedded.usage.prompt_tokens, 0)
    requests += 1

    expected = {
        "input_tokens": seen_in,
        "output_tokens": seen_out,
        "total_tokens": seen_in + seen_out,
        "requests": requests,
    }
    deadline = time.monotonic() + 5  # the stats route: this process's counts and the database
    while token_counts(real) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert token_counts(real) == expected
    wait_db_totals(Totals(seen_in, seen_out, requests, 0), real.llamas[0].v1)
    assert token_counts(real) == expected
