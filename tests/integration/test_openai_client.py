"""The official `openai` client against the real router; Ollama clients on OpenAI-only models."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest

from tests.reliability.support import Totals, wait_db_totals

KEY = "sk-llama-server-key"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
PROMPT = "why is the sky blue"  # 5 words: the fakes report 6 prompt tokens


@pytest.fixture
def mixed(fakes, endpoint, router):
    """An Ollama server with llama3 and a llama.cpp-like server (api key) with qwen-coder."""
    ollama_fake = fakes(kind="ollama", models=["llama3:latest"], tokens=5)
    llama_cpp = fakes(kind="openai", models=["qwen-coder"], tokens=7, api_key=KEY)
    endpoint(ollama_fake.url, name="gpu-ollama", max_concurrent_connections=4)
    endpoint(
        llama_cpp.url + "/v1", name="gpu-llamacpp", kind="openai", api_key=KEY, max_concurrent_connections=4
    )
    server = router()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    return ollama_fake, llama_cpp, server, client


def test_it_lists_the_merged_models(mixed):
    _, _, _, client = mixed
    assert sorted(m.id for m in client.models.list()) == ["llama3:latest", "qwen-coder"]


def test_it_retrieves_one_model_in_any_spelling_the_lists_show_and_404s_an_unknown_one(
    fakes, endpoint, router
):
    names = ["llama3:latest", "hf.co/org/Model-GGUF:Q4_K_M"]  # ids may hold '/' and ':'
    ollama_fake = fakes(kind="ollama", models=names)
    llama_cpp = fakes(kind="openai", models=["qwen-coder", "org/qwen:7b"])
    endpoint(ollama_fake.url, name="gpu-ollama", max_concurrent_connections=4)
    endpoint(llama_cpp.url + "/v1", name="gpu-llamacpp", kind="openai", max_concurrent_connections=4)
    server = router()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for asked, listed in [
        ("llama3", "llama3:latest"),
        ("llama3:latest", "llama3:latest"),
        ("hf.co/org/Model-GGUF:Q4_K_M", "hf.co/org/Model-GGUF:Q4_K_M"),
        ("qwen-coder", "qwen-coder"),
        ("org/qwen:7b", "org/qwen:7b"),
    ]:
        found = client.models.retrieve(asked)
        assert (found.id, found.object) == (listed, "model")
        assert isinstance(found.created, int) and found.owned_by
        assert found.id in {m.id for m in client.models.list()}
    for unknown in ["nope", "org/nope:1", "llama3:7b"]:
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(unknown)
        error = caught.value.response.json()["error"]
        assert error["code"] == "model_not_found" and unknown in error["message"]
        assert error["type"] == "not_found_error"
    refused = httpx.post(server.url + "/v1/models/llama3", timeout=10)
    assert refused.status_code == 405 and refused.json()["error"]["type"] == "invalid_request_error"
    # one bounded metrics label for the route, whatever the id
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    lines = [line for line in metrics.splitlines() if 'route="/v1/m' in line]
    labelled = {line.split('route="')[1].split('"')[0] for line in lines}
    assert labelled == {"/v1/models/{model_id}", "/v1/models"}


@pytest.mark.parametrize("model", ["llama3", "qwen-coder"])
def test_it_completes_a_chat_without_streaming(mixed, model):
    _, _, _, client = mixed
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}])
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens == 6


@pytest.mark.parametrize("model", ["llama3", "qwen-coder"])
def test_it_streams_without_a_usage_chunk_when_the_client_did_not_ask(mixed, model):
    _, _, _, client = mixed
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
    )
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", ["llama3", "qwen-coder"])
def test_it_streams_the_usage_chunk_when_the_client_asked(mixed, model):
    _, _, _, client = mixed
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 6


def test_it_passes_a_tool_call_through_intact(mixed):
    _, llama_cpp, _, client = mixed
    reply = client.chat.completions.create(
        model="qwen-coder", messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS, seed=7
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"x": 1}
    sent = llama_cpp.stats.bodies_for("/v1/chat/completions")[-1]
    assert sent["tools"] == TOOLS and sent["seed"] == 7  # the body reached the backend untouched


def test_it_streams_tool_call_deltas(mixed):
    _, _, _, client = mixed
    chunks = list(
        client.chat.completions.create(
            model="qwen-coder", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, stream=True
        )
    )
    names = [
        tc.function.name for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if tc.function.name
    ]
    assert names == ["get_weather"]


def test_it_completes_and_embeds(mixed):
    _, _, _, client = mixed
    completion = client.completions.create(model="qwen-coder", prompt=PROMPT)
    assert completion.choices[0].text and completion.usage.completion_tokens == 7
    embedded = client.embeddings.create(model="llama3", input=["a b", "c"])
    assert len(embedded.data) == 2


def test_it_raises_not_found_for_an_unknown_model(mixed):
    _, _, server, client = mixed
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    body = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": []}).json()
    assert body["error"]["type"] == "not_found_error" and "nope" in body["error"]["message"]


def test_it_sends_the_endpoint_api_key_as_bearer(mixed):
    _, llama_cpp, _, client = mixed
    client.chat.completions.create(model="qwen-coder", messages=[{"role": "user", "content": "hi"}])
    assert f"Bearer {KEY}" in llama_cpp.stats.snapshot()["auth_headers_seen"]


def test_it_serves_an_openai_only_model_to_the_ollama_client(mixed):
    _, llama_cpp, server, _ = mixed
    client = ollama.Client(host=server.url)
    assert "qwen-coder" in [m.model for m in client.list().models]
    reply = client.chat(
        model="qwen-coder",
        messages=[{"role": "user", "content": PROMPT}],
        options={"temperature": 0.2, "num_predict": 3},
    )
    assert reply.done and reply.prompt_eval_count == 6 and reply.eval_count == 3
    sent = llama_cpp.stats.bodies_for("/v1/chat/completions")[-1]
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 3
    chunks = list(
        client.chat(model="qwen-coder", messages=[{"role": "user", "content": PROMPT}], stream=True)
    )
    assert chunks[-1].done and chunks[-1].eval_count == 7
    assert "".join(c.message.content or "" for c in chunks).split() == [f"tok{i}" for i in range(7)]
    generated = client.generate(model="qwen-coder", prompt=PROMPT)
    assert generated.done and generated.response
    embedded = client.embed(model="qwen-coder", input="hello world")
    assert len(embedded.embeddings) == 1 and embedded.prompt_eval_count


def test_it_serves_the_legacy_embeddings_route_from_an_openai_only_model(mixed):
    _, llama_cpp, server, _ = mixed
    client = ollama.Client(host=server.url)
    legacy = client.embeddings(model="qwen-coder", prompt="hello big world")
    modern = client.embed(model="qwen-coder", input="hello big world")
    assert list(legacy.embedding) == list(modern.embeddings[0]) and len(legacy.embedding) > 0
    sent = llama_cpp.stats.bodies_for("/v1/embeddings")[-2]
    assert sent["input"] == "hello big world" and sent["model"] == "qwen-coder"
    # Unlike an Ollama server's legacy reply, this one carries usage: both calls are counted.
    wait_db_totals(Totals(input=6, output=0, requests=2, incomplete=0), llama_cpp.url + "/v1")


def test_it_translates_tool_calls_for_the_ollama_client(mixed):
    _, _, server, _ = mixed
    client = ollama.Client(host=server.url)
    reply = client.chat(model="qwen-coder", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS)
    calls = reply.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]
    assert calls[0].function.arguments == {"x": 1}
