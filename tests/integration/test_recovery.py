"""A conversation too long for a server's context is trimmed and sent once more (and trimmed
before sending from then on); images a model cannot see are dropped and the request sent once
more; /api/ps_details lists the loaded models. Real router, fake servers speaking llama.cpp's,
vLLM's and Ollama's words."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.helpers import in_flight
from tests.reliability.support import metrics_of

N_CTX = 40  # tokens; the fakes count a prompt as its words + 1
SYSTEM = {"role": "system", "content": "you are terse"}
LAST = {"role": "user", "content": "so what is the answer"}


def _turn(i: int) -> list[dict[str, str]]:
    words = " ".join(f"word{i}x{j}" for j in range(10))
    return [{"role": "user", "content": words}, {"role": "assistant", "content": words}]


LONG = [SYSTEM, *(m for i in range(3) for m in _turn(i)), LAST]  # 3 + 60 + 5 + 1 = 69 tokens


def _check_trimmed(sent: dict, removed: int) -> None:
    """What a server got after a trim: system first, the last user message last, a user
    message after the system one, `removed` fewer messages, and it fits."""
    messages = sent["messages"]
    assert messages[0] == SYSTEM and messages[-1] == LAST
    assert messages[1]["role"] == "user"
    assert len(messages) == len(LONG) - removed
    assert sum(len(m["content"].split()) for m in messages) + 1 <= N_CTX


def test_it_trims_a_conversation_llama_cpp_refuses_retries_once_and_trims_before_sending_later(
    fakes, endpoint, router
):
    llama_cpp = fakes(kind="openai", models=["qwen"], n_ctx=N_CTX)
    endpoint(llama_cpp.url + "/v1", name="small-ctx", kind="openai", max_concurrent_connections=1)
    server = router()
    reply = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "qwen", "messages": LONG}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    removed = int(reply.headers["X-Router-Trimmed"])
    assert removed > 0
    sent = llama_cpp.stats.bodies_for("/v1/chat/completions")
    assert len(sent) == 2 and sent[0]["messages"] == LONG  # refused whole, then trimmed
    _check_trimmed(sent[1], removed)

    # The context size is remembered: the next long conversation is trimmed before it is sent.
    again = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "qwen", "messages": LONG, "stream": True},
        timeout=10,
    )
    assert again.status_code == 200 and "data: [DONE]" in again.text
    sent = llama_cpp.stats.bodies_for("/v1/chat/completions")
    assert len(sent) == 3
    _check_trimmed(sent[2], int(again.headers["X-Router-Trimmed"]))
    short = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "qwen", "messages": [LAST]}, timeout=10
    )
    assert short.status_code == 200 and "X-Router-Trimmed" not in short.headers
    details = httpx.get(server.url + "/api/ps_details", timeout=10).json()["models"]
    (qwen,) = [m for m in details if m["name"] == "qwen"]
    assert qwen["context_length"] == N_CTX and qwen["endpoint_name"] == "small-ctx"
    trims = metrics_of(server).value(
        "router_context_trims_total", endpoint=llama_cpp.url + "/v1", model="qwen:latest"
    )
    assert trims == 2
    assert in_flight(server.url) == 0  # the retry reused the slot (limit 1) and gave it back


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_it_trims_on_vllm_s_and_ollama_s_words(fakes, endpoint, router, route):
    vllm = fakes(kind="openai", models=["mistral"], n_ctx=N_CTX, flavor="vllm")
    ollama_fake = fakes(kind="ollama", models=["llama3:latest"], n_ctx=N_CTX)
    endpoint(vllm.url + "/v1", name="vllm", kind="openai")
    endpoint(ollama_fake.url, name="ollama")
    server = router()
    for model, fake, path in [
        ("mistral", vllm, "/v1/chat/completions"),  # an Ollama client's chat is translated for it
        ("llama3", ollama_fake, "/api/chat" if route == "/api/chat" else "/v1/chat/completions"),
    ]:
        reply = httpx.post(
            server.url + route, json={"model": model, "messages": LONG, "stream": False}, timeout=10
        )
        assert reply.status_code == 200, (model, reply.text)
        sent = fake.stats.bodies_for(path)
        assert len(sent) == 2
        _check_trimmed(sent[1], int(reply.headers["X-Router-Trimmed"]))


def test_it_passes_the_overflow_error_back_when_trimming_is_off(fakes, endpoint, router):
    llama_cpp = fakes(kind="openai", models=["qwen"], n_ctx=N_CTX)
    endpoint(llama_cpp.url + "/v1", name="small-ctx", kind="openai")
    server = router(ROUTER_CONTEXT_TRIM="false")
    reply = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "qwen", "messages": LONG}, timeout=10
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "exceed_context_size_error"
    assert "X-Router-Trimmed" not in reply.headers
    assert len(llama_cpp.stats.bodies_for("/v1/chat/completions")) == 1


def test_it_retries_without_images_for_a_model_that_cannot_see_and_counts_it(fakes, endpoint, router):
    llama_cpp = fakes(kind="openai", models=["qwen"], vision=False)
    ollama_fake = fakes(kind="ollama", models=["llama3:latest"], vision=False, loaded=["llama3:latest"])
    endpoint(llama_cpp.url + "/v1", name="no-mmproj", kind="openai", max_concurrent_connections=1)
    endpoint(ollama_fake.url, name="text-only", max_concurrent_connections=1)
    server = router()
    parts = [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    reply = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "qwen", "messages": [{"role": "user", "content": parts}]},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Router-Images-Dropped"] == "1"
    first, second = llama_cpp.stats.bodies_for("/v1/chat/completions")
    assert first["messages"][0]["content"] == parts
    assert second["messages"][0]["content"] == [parts[0]]

    ollama_reply = httpx.post(
        server.url + "/api/chat",
        json={
            "model": "llama3",
            "stream": False,
            "messages": [
                {"role": "user", "content": "and this?", "images": ["iVBORw0KGgo=", "iVBORw0KGgo="]}
            ],
        },
        timeout=10,
    )
    assert ollama_reply.status_code == 200, ollama_reply.text
    assert ollama_reply.headers["X-Router-Images-Dropped"] == "2"
    first, second = ollama_fake.stats.bodies_for("/api/chat")
    assert len(first["messages"][0]["images"]) == 2 and "images" not in second["messages"][0]
    metrics = metrics_of(server)
    assert (
        metrics.value("router_image_retries_total", endpoint=llama_cpp.url + "/v1", model="qwen:latest") == 1
    )
    assert metrics.value("router_image_retries_total", endpoint=ollama_fake.url, model="llama3:latest") == 1
    assert in_flight(server.url) == 0

    details = httpx.get(server.url + "/api/ps_details", timeout=10).json()["models"]
    by_name = {m["name"]: m for m in details}
    assert by_name["llama3:latest"]["endpoint"] == ollama_fake.url
    assert by_name["llama3:latest"]["endpoint_name"] == "text-only"
    assert by_name["qwen"]["endpoint"] == llama_cpp.url + "/v1"
    assert by_name["qwen"]["owned_by"] is not None and "context_length" not in by_name["qwen"]


def test_a_server_that_refuses_stream_options_still_gets_the_trimmed_conversation(fakes, endpoint, router):
    strict = fakes(kind="openai", models=["qwen"], n_ctx=N_CTX, reject_fields=["stream_options"])
    endpoint(strict.url + "/v1", name="strict", kind="openai", max_concurrent_connections=1)
    server = router()
    for _ in range(2):  # learning both refusals, then trimmed before sending and sent without the field
        reply = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "qwen", "messages": LONG, "stream": True},
            timeout=10,
        )
        assert reply.status_code == 200 and "data: [DONE]" in reply.text, reply.text
        assert int(reply.headers["X-Router-Trimmed"]) > 0
    sent = strict.stats.bodies_for("/v1/chat/completions")
    assert [("stream_options" in b, len(b["messages"]) < len(LONG)) for b in sent] == [
        (True, False),  # refused: the field
        (False, False),  # refused: the context
        (False, True),  # served
        (False, True),  # served: trimmed before sending, without the field
    ]
    assert in_flight(server.url) == 0


def _anthropic_long() -> list[dict[str, str]]:
    return [m for m in LONG if m["role"] != "system"]


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_messages_are_trimmed_and_images_dropped_like_the_other_chat_routes(
    fakes, endpoint, router, stream
):
    # /v1/messages once passed a server's "too long" and "cannot see images" back to the
    # client: the recovery hook was only on the OpenAI and Ollama chat routes.
    llama_cpp = fakes(kind="openai", models=["qwen"], n_ctx=N_CTX, vision=False)
    ollama_fake = fakes(kind="ollama", models=["llama3:latest"], n_ctx=N_CTX, vision=False)
    endpoint(llama_cpp.url + "/v1", name="small-ctx", kind="openai", max_concurrent_connections=1)
    endpoint(ollama_fake.url, name="ollama", max_concurrent_connections=1)
    server = router()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    for model, fake, path in [
        ("qwen", llama_cpp, "/v1/chat/completions"),
        ("llama3", ollama_fake, "/api/chat"),
    ]:
        base = {"model": model, "max_tokens": 5, "stream": stream, "system": SYSTEM["content"]}
        reply = httpx.post(
            server.url + "/v1/messages", json={**base, "messages": _anthropic_long()}, timeout=10
        )
        assert reply.status_code == 200, (model, reply.text)
        assert int(reply.headers["X-Router-Trimmed"]) > 0
        first, second = fake.stats.bodies_for(path)[-2:]
        assert first["messages"][0] == SYSTEM and len(second["messages"]) < len(first["messages"])
        assert second["messages"][0] == SYSTEM and second["messages"][-1] == LAST

        seen = [{"type": "text", "text": "what is this"}, image]
        reply = httpx.post(
            server.url + "/v1/messages",
            json={**base, "messages": [{"role": "user", "content": seen}]},
            timeout=10,
        )
        assert reply.status_code == 200, (model, reply.text)
        assert reply.headers["X-Router-Images-Dropped"] == "1"
    assert in_flight(server.url) == 0


def test_a_prompt_that_cannot_be_trimmed_is_the_servers_refusal_sent_once(fakes, endpoint, router):
    llama_cpp = fakes(kind="openai", models=["qwen"], n_ctx=N_CTX)
    endpoint(llama_cpp.url + "/v1", name="small-ctx", kind="openai", max_concurrent_connections=1)
    server = router()
    huge = {"role": "user", "content": "word " * 200}
    for _ in range(2):  # the second time the context is known and the router trims first
        reply = httpx.post(
            server.url + "/v1/messages",
            json={"model": "qwen", "max_tokens": 5, "system": "terse", "messages": [huge]},
            timeout=10,
        )
        assert reply.status_code == 400
        assert reply.json()["type"] == "error" and "context" in reply.json()["error"]["message"]
    assert len(llama_cpp.stats.bodies_for("/v1/chat/completions")) == 2  # once each, no retry loop
    assert in_flight(server.url) == 0
