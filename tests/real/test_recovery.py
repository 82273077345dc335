"""Against the real llama.cpp server of the suite (started without `--reranking`, 1024 tokens of
context per slot): rerank is refused clearly, and a conversation longer than the context is
trimmed and answered. No reranker GGUF is installed by the suite, so a served rerank is tested
against the fakes only (tests/integration/test_rerank.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.real.conftest import Real
from tests.real.llama import ALIAS

SYSTEM = {"role": "system", "content": "Answer in one word."}
LAST = {"role": "user", "content": "Name a colour."}


def _long_conversation() -> list[dict[str, str]]:
    """About 1,800 tokens of old turns (well past the 1,024 of a slot), then a short question."""
    filler = " ".join(f"item{i}" for i in range(150))
    turns = [
        m
        for _ in range(4)
        for m in ({"role": "user", "content": filler}, {"role": "assistant", "content": "ok"})
    ]
    return [SYSTEM, *turns, LAST]


@pytest.fixture
def real(real_router) -> Real:
    return real_router()


def test_a_server_started_without_reranking_gets_a_clear_501(real):
    body = {"model": ALIAS, "query": "colour", "documents": ["red", "table"]}
    direct = httpx.post(real.llamas[0].v1 + "/rerank", json=body, timeout=30)
    assert direct.status_code in (404, 501), direct.text  # what llama-server says without --reranking
    for path in ("/v1/rerank", "/rerank"):
        reply = httpx.post(real.url + path, json=body, timeout=30)
        assert reply.status_code == 501, reply.text
        assert f"no server serves reranking for model '{ALIAS}'" in reply.json()["error"]["message"]


def test_a_conversation_longer_than_the_context_is_trimmed_and_answered(real):
    messages = _long_conversation()
    body = {"model": ALIAS, "messages": messages, "max_tokens": 4, "temperature": 0}
    direct = httpx.post(real.llamas[0].v1 + "/chat/completions", json=body, timeout=120)
    if direct.status_code == 200:
        pytest.skip("this llama-server build shifts the context instead of refusing a long prompt")
    assert direct.status_code == 400 and "context" in direct.text, direct.text
    reply = httpx.post(real.url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert int(reply.headers["X-Router-Trimmed"]) > 0
    assert reply.json()["usage"]["prompt_tokens"] < 1024
    details = httpx.get(real.url + "/api/ps_details", timeout=10).json()["models"]
    assert [m.get("context_length") for m in details if m["name"] == ALIAS] == [1024]
