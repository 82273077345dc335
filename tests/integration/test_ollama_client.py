"""The official `ollama` client against the real router and two fake Ollama servers."""

from __future__ import annotations

import httpx
import ollama
import pytest

PROMPT = "why is the sky blue"  # 5 words: the fake reports prompt_eval_count 6


@pytest.fixture
def fleet(fakes, endpoint, router):
    first = fakes(
        kind="ollama", models=["llama3:latest", "nomic-embed:latest"], loaded=["llama3:latest"], tokens=5
    )
    second = fakes(kind="ollama", models=["llama3:latest", "qwen2:7b"], tokens=5, version="0.11.4")
    endpoint(first.url, name="gpu-1", max_concurrent_connections=2)
    endpoint(second.url, name="gpu-2", max_concurrent_connections=2)
    server = router()
    return first, second, server, ollama.Client(host=server.url)


def test_it_lists_the_merged_models(fleet):
    _, _, _, client = fleet
    names = sorted(m.model for m in client.list().models)
    assert names == ["llama3:latest", "nomic-embed:latest", "qwen2:7b"]


def test_it_lists_loaded_models(fleet):
    _, _, _, client = fleet
    assert [m.model for m in client.ps().models] == ["llama3:latest"]


def test_it_chats_streaming_and_not(fleet):
    _first, _second, _, client = fleet
    reply = client.chat(model="llama3", messages=[{"role": "user", "content": PROMPT}])
    assert reply.done and reply.eval_count == 5 and reply.prompt_eval_count == 6
    chunks = list(client.chat(model="llama3", messages=[{"role": "user", "content": PROMPT}], stream=True))
    assert len(chunks) == 6 and chunks[-1].done and chunks[-1].eval_count == 5
    assert "".join(c.message.content for c in chunks[:-1]).split() == [f"tok{i}" for i in range(5)]


def test_it_generates_streaming_and_not(fleet):
    _, _, _, client = fleet
    reply = client.generate(model="llama3", prompt=PROMPT)
    assert reply.done and reply.eval_count == 5
    chunks = list(client.generate(model="llama3", prompt=PROMPT, stream=True))
    assert chunks[-1].done and chunks[-1].context


def test_it_routes_a_model_only_the_second_endpoint_has(fleet):
    first, second, _, client = fleet
    reply = client.chat(model="qwen2:7b", messages=[{"role": "user", "content": PROMPT}])
    assert reply.done
    assert second.stats.snapshot()["requests"].get("/api/chat") == 1
    assert first.stats.snapshot()["requests"].get("/api/chat") is None


def test_it_embeds_and_shows(fleet):
    _, _, _, client = fleet
    result = client.embed(model="nomic-embed", input=["a b", "c"])
    assert len(result.embeddings) == 2
    shown = client.show("llama3")
    assert shown.details is not None


def test_it_answers_404_for_an_unknown_model_as_ollama_does(fleet):
    _, _, server, client = fleet
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404
    reply = httpx.post(server.url + "/api/chat", json={"model": "nope", "messages": []})
    assert reply.json() == {"error": "model 'nope' not found"}


def test_it_reports_the_lowest_version(fleet):
    _, _, server, _ = fleet
    assert httpx.get(server.url + "/api/version").json() == {"version": "0.11.4"}
