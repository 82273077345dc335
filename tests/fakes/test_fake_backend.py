"""Tests of the fake LLM backend (bench/fake_backend.py).

The fake is checked against the official ``ollama`` and ``openai`` clients,
so the rest of the suite can trust it as a stand-in for real backends.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from bench.fake_backend import (
    FakeBackend,
    FakeConfig,
    FakeStats,
    PrefixCache,
    ThreadedFake,
    run_in_thread,
)

REPO = Path(__file__).resolve().parents[2]
PROMPT = "why is the sky blue"  # 5 words -> prompt_eval_count 6
API_KEY = "sk-test-key"


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll until predicate() is true (stats are updated on the server's loop)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def ollama_fake() -> Iterator[ThreadedFake]:
    """An Ollama-kind fake with two models, one of them loaded, in a thread."""
    fake = run_in_thread(
        FakeConfig(
            kind="ollama",
            models=["llama3:latest", "nomic-embed"],
            loaded=["llama3:latest"],
        )
    )
    yield fake
    fake.stop()


@pytest.fixture
def openai_fake() -> Iterator[ThreadedFake]:
    """An OpenAI-kind (llama.cpp-like) fake that requires an API key, in a thread."""
    fake = run_in_thread(FakeConfig(kind="openai", models=["qwen-coder"], api_key=API_KEY))
    yield fake
    fake.stop()


def oa_client(fake: ThreadedFake, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url + "/v1", api_key=key, max_retries=0, timeout=5)


# --------------------------------------------------------------------------- ollama kind


def test_it_lists_models_and_running_models_for_the_ollama_client(
    ollama_fake: ThreadedFake,
) -> None:
    client = ollama.Client(host=ollama_fake.url)
    listed = client.list()
    assert [m.model for m in listed.models] == ["llama3:latest", "nomic-embed"]
    assert all(m.digest and m.size and m.details for m in listed.models)
    running = client.ps()
    assert [m.model for m in running.models] == ["llama3:latest"]
    assert running.models[0].expires_at is not None
    assert running.models[0].size_vram
    assert httpx.get(ollama_fake.url + "/api/version").json() == {"version": "0.12.0"}
    assert httpx.get(ollama_fake.url + "/").text == "Ollama is running"


def test_it_streams_a_chat_with_deterministic_counts(ollama_fake: ThreadedFake) -> None:
    client = ollama.Client(host=ollama_fake.url)
    parts = list(
        client.chat(
            model="llama3",  # the ":latest" tag is implied, as in Ollama
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": PROMPT},
            ],
            stream=True,
        )
    )
    assert len(parts) == 8 + 1
    assert "".join(p.message.content or "" for p in parts) == "".join(f"tok{i} " for i in range(8))
    final = parts[-1]
    assert final.done and final.done_reason == "stop"
    assert final.prompt_eval_count == 2 + 5 + 1
    assert final.eval_count == 8
    assert final.total_duration and final.eval_duration
    stats = ollama_fake.stats
    assert stats.completed == 1
    assert stats.prompt_tokens_reported == 8
    assert stats.completion_tokens_reported == 8
    assert stats.requests["/api/chat"] == 1
    assert stats.max_in_flight == {"llama3:latest": 1}
    wait_for(lambda: stats.in_flight == {"llama3:latest": 0})  # leaves just after the last byte


def test_it_answers_a_chat_without_streaming_and_honours_num_predict(
    ollama_fake: ThreadedFake,
) -> None:
    client = ollama.Client(host=ollama_fake.url)
    reply = client.chat(
        model="llama3:latest",
        messages=[{"role": "user", "content": PROMPT}],
        options={"num_predict": 3, "temperature": 0.1},
        stream=False,
    )
    assert reply.message.content == "tok0 tok1 tok2 "
    assert reply.eval_count == 3
    assert reply.prompt_eval_count == 6
    assert reply.done_reason == "length"
    body = ollama_fake.stats.bodies_for("/api/chat")[-1]
    assert body["options"] == {"num_predict": 3, "temperature": 0.1}


def test_it_generates_with_a_context_in_the_final_chunk(
    ollama_fake: ThreadedFake,
) -> None:
    client = ollama.Client(host=ollama_fake.url)
    parts = list(client.generate(model="llama3", prompt=PROMPT, stream=True))
    assert "".join(p.response or "" for p in parts) == "".join(f"tok{i} " for i in range(8))
    assert parts[-1].context and parts[-1].prompt_eval_count == 6
    single = client.generate(model="llama3", prompt="hi", stream=False)
    assert single.response == "".join(f"tok{i} " for i in range(8))
    assert single.prompt_eval_count == 2 and single.eval_count == 8
    assert ollama_fake.stats.completed == 2


def test_it_returns_a_tool_call_when_tools_are_given(ollama_fake: ThreadedFake) -> None:
    client = ollama.Client(host=ollama_fake.url)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    reply = client.chat(model="llama3", messages=[{"role": "user", "content": "weather?"}], tools=tools)
    assert reply.message.content == ""
    calls = reply.message.tool_calls or []
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"x": 1}


def test_it_embeds_with_the_ollama_client(ollama_fake: ThreadedFake) -> None:
    client = ollama.Client(host=ollama_fake.url)
    out = client.embed(model="nomic-embed", input=["one two", "three"])
    assert len(out.embeddings) == 2 and all(len(v) == 8 for v in out.embeddings)
    assert out.prompt_eval_count == 3
    again = client.embed(model="nomic-embed", input="one two")
    assert list(again.embeddings[0]) == list(out.embeddings[0])  # deterministic
    legacy = client.embeddings(model="nomic-embed", prompt="one two")
    assert list(legacy.embedding) == list(out.embeddings[0])
    assert ollama_fake.stats.prompt_tokens_reported == 3 + 2


def test_it_answers_404_for_an_unknown_model(ollama_fake: ThreadedFake) -> None:
    client = ollama.Client(host=ollama_fake.url)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="mistral", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert "model 'mistral' not found" in info.value.error
    r = httpx.post(ollama_fake.url + "/api/show", json={"model": "mistral"})
    assert r.status_code == 404 and r.json() == {"error": "model 'mistral' not found"}
    assert ollama_fake.stats.in_flight == {}


def test_it_pulls_copies_shows_and_deletes_models(ollama_fake: ThreadedFake) -> None:
    client = ollama.Client(host=ollama_fake.url)
    progress = [p.status for p in client.pull("phi3", stream=True)]
    assert progress == ["pulling manifest", *["downloading"] * 3, "success"]
    assert "phi3:latest" in ollama_fake.config.models
    assert client.copy("phi3", "phi3-copy").status == "success"
    assert client.show("phi3-copy").details is not None
    assert client.delete("phi3").status == "success"
    assert "phi3:latest" not in ollama_fake.config.models
    with pytest.raises(ollama.ResponseError):
        client.delete("phi3")
    assert client.create(model="mine", from_="llama3").status == "success"
    assert "mine:latest" in ollama_fake.config.models


def test_it_serves_ollamas_openai_compatible_routes(ollama_fake: ThreadedFake) -> None:
    client = openai.OpenAI(base_url=ollama_fake.url + "/v1", api_key="ollama", max_retries=0)
    assert [m.id for m in client.models.list()] == ["llama3:latest", "nomic-embed"]
    reply = client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": PROMPT}], max_tokens=2
    )
    assert reply.choices[0].message.content == "tok0 tok1 "
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (6, 2)


# --------------------------------------------------------------------------- openai kind


def test_it_rejects_a_wrong_api_key(openai_fake: ThreadedFake) -> None:
    with pytest.raises(openai.AuthenticationError):
        oa_client(openai_fake, key="wrong").models.list()
    r = httpx.get(openai_fake.url + "/health")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert openai_fake.stats.auth_headers_seen[-1] is None
    assert openai_fake.stats.auth_headers_seen[0] == "Bearer wrong"


def test_it_sends_the_usage_chunk_only_when_asked(openai_fake: ThreadedFake) -> None:
    client = oa_client(openai_fake)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
    plain = list(client.chat.completions.create(model="qwen-coder", messages=messages, stream=True))
    assert all(c.usage is None for c in plain)
    assert plain[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "".join(f"tok{i} " for i in range(8))
    assert plain[-1].choices[0].finish_reason == "stop"
    # nothing was reported to the client, so nothing is counted as reported
    assert openai_fake.stats.completed == 1
    assert openai_fake.stats.completion_tokens_reported == 0

    with_usage = list(
        client.chat.completions.create(
            model="qwen-coder",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = with_usage[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (6, 8)
    assert last.usage.total_tokens == 14
    assert openai_fake.stats.prompt_tokens_reported == 6
    assert openai_fake.stats.completion_tokens_reported == 8
    assert openai_fake.stats.auth_headers_seen[-1] == f"Bearer {API_KEY}"


def test_it_returns_tool_calls_to_the_openai_client(openai_fake: ThreadedFake) -> None:
    client = oa_client(openai_fake)
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    ]
    reply = client.chat.completions.create(
        model="qwen-coder",
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = (choice.message.tool_calls or [])[0]
    assert call.type == "function"
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"x": 1}

    chunks = list(
        client.chat.completions.create(
            model="qwen-coder",
            messages=[{"role": "user", "content": "hi"}],
            tools=tools,
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function is not None and deltas[0].function.name == "lookup"
    args = "".join((d.function.arguments or "") if d.function else "" for d in deltas)
    assert json.loads(args) == {"x": 1}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_it_streams_reasoning_before_the_content(openai_fake: ThreadedFake) -> None:
    r = httpx.post(
        openai_fake.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": "qwen-coder",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "reasoning_effort": "low",
        },
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    kinds = ["reasoning" if d.get("reasoning_content") else "content" for d in deltas[:-1]]
    assert kinds == ["reasoning"] * 2 + ["content"] * 8


def test_it_completes_and_embeds_with_the_openai_client(
    openai_fake: ThreadedFake,
) -> None:
    client = oa_client(openai_fake)
    done = client.completions.create(model="qwen-coder", prompt=PROMPT, max_tokens=4)
    assert done.choices[0].text == "tok0 tok1 tok2 tok3 "
    assert done.usage is not None and done.usage.prompt_tokens == 6
    streamed = list(
        client.completions.create(
            model="qwen-coder",
            prompt="hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "".join(f"tok{i} " for i in range(8))
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == 8

    emb = client.embeddings.create(model="qwen-coder", input=["a b c", "d"])
    assert [d.index for d in emb.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in emb.data)
    assert emb.usage.prompt_tokens == 4
    b64 = client.embeddings.create(model="qwen-coder", input="a b c", encoding_format="base64")
    raw = base64.b64decode(str(b64.data[0].embedding))
    assert struct.unpack("<8f", raw) == pytest.approx(emb.data[0].embedding, abs=1e-6)


def test_it_answers_an_openai_error_for_an_unknown_model(
    openai_fake: ThreadedFake,
) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oa_client(openai_fake).chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


# --------------------------------------------------------------------------- concurrency


@pytest.mark.asyncio
async def test_it_records_the_highest_concurrency_per_model() -> None:
    config = FakeConfig(models=["llama3:latest"], tokens=4, delay=0.05)
    async with (
        FakeBackend(config) as fake,
        httpx.AsyncClient(base_url=fake.url) as client,
    ):

        async def chat() -> int:
            r = await client.post(
                "/api/chat",
                json={
                    "model": "llama3",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            return len(r.text.splitlines())

        lines = await asyncio.gather(*(chat() for _ in range(6)))
    assert lines == [5] * 6
    assert fake.stats.max_in_flight == {"llama3:latest": 6}
    wait_for(lambda: fake.stats.in_flight == {"llama3:latest": 0})  # leaves just after the last byte
    assert fake.stats.completed == 6


@pytest.mark.asyncio
async def test_it_counts_a_client_that_goes_away_as_cancelled() -> None:
    config = FakeConfig(models=["m:latest"], tokens=50, delay=0.02)
    async with FakeBackend(config) as fake:
        async with (
            httpx.AsyncClient(base_url=fake.url) as client,
            client.stream("POST", "/api/generate", json={"model": "m", "prompt": "x"}) as r,
        ):
            seen = 0
            async for _ in r.aiter_lines():
                seen += 1
                if seen == 2:
                    break
        for _ in range(200):
            if fake.stats.cancelled:
                break
            await asyncio.sleep(0.01)
        assert fake.stats.cancelled == 1
        assert fake.stats.completed == 0
        assert fake.stats.in_flight == {"m:latest": 0}
        assert fake.stats.completion_tokens_reported == 0


# --------------------------------------------------------------------------- faults


CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("status", [500, 503])
def test_it_fails_with_an_error_status_before_any_body(ollama_fake: ThreadedFake, status: int) -> None:
    ollama_fake.config.fault = str(status)
    r = httpx.post(ollama_fake.url + "/api/chat", json=CHAT)
    assert r.status_code == status and "error" in r.json()
    r = httpx.post(ollama_fake.url + "/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == status and "message" in r.json()["error"]
    assert httpx.get(ollama_fake.url + "/api/tags").status_code == 200  # not a generation
    stats = ollama_fake.stats
    assert (stats.faults, stats.completed, stats.cancelled) == (2, 0, 0)
    wait_for(lambda: stats.in_flight == {"llama3:latest": 0})  # leaves just after the last byte


def test_it_resets_the_connection_without_a_response(ollama_fake: ThreadedFake) -> None:
    ollama_fake.config.fault = "reset"
    with pytest.raises(httpx.TransportError):
        httpx.post(ollama_fake.url + "/api/chat", json=CHAT)
    wait_for(lambda: ollama_fake.stats.in_flight == {"llama3:latest": 0})
    assert (ollama_fake.stats.cancelled, ollama_fake.stats.completed) == (0, 0)


@pytest.mark.parametrize(
    ("path", "body", "marker"),
    [
        ("/api/chat", CHAT, b'"done":false'),
        ("/v1/chat/completions", {**CHAT, "stream": True}, b"chat.completion.chunk"),
    ],
)
def test_it_dies_in_the_middle_of_a_stream(
    ollama_fake: ThreadedFake, path: str, body: dict[str, object], marker: bytes
) -> None:
    ollama_fake.config.fault = "die_midstream"
    ollama_fake.config.fault_after = 3
    received = b""
    with (
        pytest.raises(httpx.TransportError),
        httpx.stream("POST", ollama_fake.url + path, json=body) as r,
    ):
        assert r.status_code == 200
        for data in r.iter_raw():
            received += data
    assert received.count(marker) == 3
    assert b'"done":true' not in received and b"[DONE]" not in received
    wait_for(lambda: ollama_fake.stats.in_flight == {"llama3:latest": 0})
    assert (ollama_fake.stats.cancelled, ollama_fake.stats.completed) == (0, 0)


def test_it_stalls_between_chunks_then_finishes(ollama_fake: ThreadedFake) -> None:
    ollama_fake.config.update({"fault": "stall", "stall": 0.3, "fault_after": 2})
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", ollama_fake.url + "/api/chat", json=CHAT) as r:
        for _ in r.iter_lines():
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 9
    assert arrivals[1] < 0.25 and arrivals[2] >= 0.3
    assert ollama_fake.stats.completed == 1 and ollama_fake.stats.faults == 1


def test_it_counts_a_client_timing_out_on_a_stall_as_cancelled(
    ollama_fake: ThreadedFake,
) -> None:
    ollama_fake.config.update({"fault": "stall", "stall": 10, "fault_after": 1})
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("POST", ollama_fake.url + "/api/chat", json=CHAT, timeout=0.3) as r,
    ):
        for _ in r.iter_lines():
            pass
    wait_for(lambda: ollama_fake.stats.cancelled == 1)
    wait_for(lambda: ollama_fake.stats.in_flight == {"llama3:latest": 0})  # leaves just after the last byte


def test_it_answers_garbage_with_the_normal_content_type(
    ollama_fake: ThreadedFake,
) -> None:
    ollama_fake.config.fault = "garbage"
    r = httpx.post(ollama_fake.url + "/api/chat", json=CHAT)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.text == "this is not json\n"
    with pytest.raises(ValueError):
        r.json()


def test_it_delays_the_first_byte(ollama_fake: ThreadedFake) -> None:
    ollama_fake.config.update({"fault": "slow_first_byte", "first_byte_delay": 0.3})
    start = time.monotonic()
    r = httpx.post(ollama_fake.url + "/api/embed", json={"model": "nomic-embed", "input": "x"})
    assert r.status_code == 200 and time.monotonic() - start >= 0.3
    ollama_fake.config.fault = "none"
    start = time.monotonic()
    httpx.post(ollama_fake.url + "/api/embed", json={"model": "nomic-embed", "input": "x"})
    assert time.monotonic() - start >= 0.3  # first_byte_delay also applies on its own


# --------------------------------------------------------------------------- control & CLI


def test_it_is_driven_through_the_control_routes(ollama_fake: ThreadedFake) -> None:
    url = ollama_fake.url
    assert httpx.post(url + "/_fake/config", json={"fault": "500"}).status_code == 200
    assert httpx.post(url + "/api/generate", json={"model": "llama3", "prompt": "x"}).status_code == 500
    assert httpx.post(url + "/_fake/config", json={"fault": "boom"}).status_code == 400
    assert httpx.post(url + "/_fake/config", json={"nope": 1}).status_code == 400
    httpx.post(url + "/_fake/config", json={"fault": "none", "tokens": 2})
    httpx.post(url + "/api/generate", json={"model": "llama3", "prompt": "x", "stream": False})
    stats = httpx.get(url + "/_fake/stats").json()
    assert stats["requests"] == {"/api/generate": 2}
    assert stats["completion_tokens_reported"] == 2
    assert stats["last_request_bodies"][-1]["path"] == "/api/generate"
    assert httpx.post(url + "/_fake/reset").status_code == 200
    assert httpx.get(url + "/_fake/stats").json()["requests"] == {}
    assert ollama_fake.stats.completed == 0


def test_stats_reset_keeps_requests_that_are_still_running() -> None:
    stats = FakeStats()
    stats.enter("m")
    stats.note_request("/api/chat", None)
    stats.reset()
    assert stats.in_flight == {"m": 1} and stats.requests == {}
    stats.leave("m")
    assert stats.in_flight == {"m": 0}


def test_it_runs_from_the_command_line() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.fake_backend",
            "--kind",
            "openai",
            "--port",
            "0",
            "--models",
            "a,b",
            "--tokens",
            "3",
            "--api-key",
            "K",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer K"})
        assert [m["id"] for m in r.json()["data"]] == ["a", "b"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


# --------------------------------------------------------------------------- prefix cache


def test_the_prefix_cache_finds_the_longest_cached_prefix_and_is_bounded() -> None:
    cache = PrefixCache()
    block = PrefixCache.BLOCK
    turn1 = [f"w{i}" for i in range(3 * block + 5)]
    assert cache.lookup_and_store(turn1, size=2) == 0
    turn2 = [*turn1, *(f"x{i}" for i in range(2 * block))]
    assert cache.lookup_and_store(turn2, size=2) == 3 * block  # turn 1's full blocks
    other = [f"o{i}" for i in range(2 * block)]
    assert cache.lookup_and_store(other, size=2) == 0
    third = [f"t{i}" for i in range(block)]
    cache.lookup_and_store(third, size=2)  # the third entry: the least recently used goes
    assert cache.lookup_and_store([*turn2, "more"], size=2) == 0
    assert cache.lookup_and_store(other, size=2) == 0  # evicted by the re-stored turn2 as well


def test_it_charges_prefill_only_for_the_uncached_prompt_and_counts_hits(
    ollama_fake: ThreadedFake,
) -> None:
    ollama_fake.config.update({"prefill": 0.0001, "prefix_cache": 4})
    system = {"role": "system", "content": " ".join(f"rule{i}" for i in range(40))}
    first = [system, {"role": "user", "content": "first question " * 10}]
    second = [*first, {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "and then"}]
    client = ollama.Client(host=ollama_fake.url)
    client.chat(model="llama3", messages=first, stream=False)
    client.chat(model="llama3", messages=second, stream=False)
    openai_client = openai.OpenAI(base_url=ollama_fake.url + "/v1", api_key="x", max_retries=0, timeout=5)
    again = cast(list[ChatCompletionMessageParam], second)  # the same prompt again
    openai_client.chat.completions.create(model="llama3", messages=again)
    prefix = ollama_fake.stats.snapshot()["prefix"]
    assert prefix["requests"] == 3 and prefix["hits"] == 2
    assert prefix["prompt_tokens"] == 61 + 65 + 65  # content words + 1 per request
    # whole blocks of 16 words of the sequence with role markers: 62 words (3 blocks), then 68 (4)
    assert prefix["cached_tokens"] == 48 + 64
    httpx.post(ollama_fake.url + "/_fake/reset")
    client.chat(model="llama3", messages=second, stream=False)
    assert ollama_fake.stats.snapshot()["prefix"]["hits"] == 0  # reset forgets the cache too
