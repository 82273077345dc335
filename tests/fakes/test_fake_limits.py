"""The fake backend's context size, vision flag and rerank route (bench/fake_backend.py): each
refusal in the words of the server kind it plays, so the router's recovery is tested on them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from bench.fake_backend import FakeConfig, ThreadedFake, run_in_thread

LONG = [{"role": "user", "content": " ".join(["w"] * 20)}]  # 21 prompt tokens


@pytest.fixture
def start() -> Iterator:
    started: list[ThreadedFake] = []

    def run(**config: object) -> ThreadedFake:
        fake = run_in_thread(FakeConfig(**config))  # type: ignore[arg-type]
        started.append(fake)
        return fake

    yield run
    for fake in started:
        fake.stop()


def test_a_prompt_over_n_ctx_is_refused_in_each_server_s_words(start) -> None:
    llama = start(kind="openai", models=["m"], n_ctx=10)
    reply = httpx.post(llama.url + "/v1/chat/completions", json={"model": "m", "messages": LONG})
    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 21,
        "n_ctx": 10,
    }
    vllm = start(kind="openai", models=["m"], n_ctx=10, flavor="vllm", tokens=3)
    reply = httpx.post(vllm.url + "/v1/chat/completions", json={"model": "m", "messages": LONG})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith(
        "This model's maximum context length is 10 tokens. "
        "However, you requested 24 tokens (21 in the messages"
    )
    ollama_fake = start(kind="ollama", models=["m:latest"], n_ctx=10)
    reply = httpx.post(ollama_fake.url + "/api/chat", json={"model": "m", "messages": LONG, "stream": False})
    assert reply.status_code == 400 and "exceeds the context length" in reply.json()["error"]
    fits = httpx.post(
        llama.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert fits.status_code == 200


def test_images_are_refused_without_vision(start) -> None:
    llama = start(kind="openai", models=["m"], vision=False)
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    reply = httpx.post(
        llama.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": parts}]},
    )
    assert reply.status_code == 400 and "image input is not supported" in reply.json()["error"]["message"]
    ollama_fake = start(kind="ollama", models=["m:latest"], vision=False)
    reply = httpx.post(
        ollama_fake.url + "/api/generate",
        json={"model": "m", "prompt": "p", "images": ["aGk="], "stream": False},
    )
    assert reply.status_code == 500 and "missing data required for image input" in reply.json()["error"]


def test_rerank_scores_by_shared_words_and_reports_its_tokens(start) -> None:
    fake = start(kind="openai", models=["rr"], reranking=True)
    body = {"model": "rr", "query": "red apple", "documents": ["green pear", "red apple pie", "a red car"]}
    for path in ("/v1/rerank", "/rerank"):
        reply = httpx.post(fake.url + path, json=body)
        assert reply.status_code == 200
        data = reply.json()
        assert [(r["index"], r["relevance_score"]) for r in data["results"]] == [(0, 0.0), (1, 1.0), (2, 0.5)]
        assert data["usage"] == {"prompt_tokens": 20, "total_tokens": 20}  # query + document + 2, each
    assert fake.stats.prompt_tokens_reported == 40


def test_rerank_without_reranking_is_llama_cpp_s_501(start) -> None:
    fake = start(kind="openai", models=["rr"])
    reply = httpx.post(fake.url + "/v1/rerank", json={"model": "rr", "query": "q", "documents": ["d"]})
    assert reply.status_code == 501
    assert reply.json()["error"]["type"] == "not_supported_error"
    assert "--reranking" in reply.json()["error"]["message"]
