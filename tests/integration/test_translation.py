# ruff: noqa: E501  (SSE events written one per line)
"""Ollama requests on OpenAI-compatible servers, over real sockets (issue 12, items 4-7).

The router runs as its own process in front of a scripted OpenAI-compatible server
(tests/integration/scripted.py: it answers what each test says and records what it got)
and two Ollama fakes that both have `llama3` loaded. Checked from both ends: what the
server received, and what the Ollama client got back.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import ollama
import pytest

from tests.conftest import wait_until
from tests.integration.helpers import in_flight
from tests.integration.scripted import Reply, ScriptedServer, chat_chunk, usage, usage_chunk
from tests.reliability.support import Totals, wait_db_totals

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object"}},
}


class Scripts:
    def __init__(self) -> None:
        self.reply = Reply(whole={})

    def __call__(self, path: str, body: dict[str, Any]) -> Reply:
        return self.reply


@pytest.fixture
def xl(fakes, endpoint, router):
    scripts = Scripts()
    server = ScriptedServer(models=["gpt-x"], script=scripts).start()
    first = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], tokens=3)
    second = fakes(kind="ollama", models=["llama3:latest"], loaded=["llama3:latest"], tokens=3)
    endpoint(first.url, name="ollama-a", max_concurrent_connections=2)
    endpoint(second.url, name="ollama-b", max_concurrent_connections=2)
    endpoint(server.url, name="llamacpp", kind="openai", max_concurrent_connections=2)
    proc = router()
    try:
        yield scripts, server, (first, second), proc
    finally:
        server.stop()


def whole_chat(content: str | None = None, **message: Any) -> dict[str, Any]:
    msg = {"role": "assistant", "content": content, **message}
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
        "usage": usage(),
    }


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "weather and time in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"function": {"name": "get_time", "arguments": {"city": "Oslo"}}},
        ],
    },
    # answered in the other order, by name
    {"role": "tool", "tool_name": "get_time", "content": "12:00"},
    {"role": "tool", "tool_name": "get_weather", "content": "18C, sunny"},
]


# --------------------------------------------------------------------------- 4. tool calls


def test_tool_results_carry_the_id_of_the_call_they_answer(xl):
    scripts, server, _, proc = xl
    scripts.reply = Reply(whole=whole_chat("It is 18C at 12:00."))
    body = {"model": "gpt-x", "stream": False, "messages": CONVERSATION, "tools": [WEATHER, TIME]}
    reply = httpx.post(proc.url + "/api/chat", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["message"]["content"] == "It is 18C at 12:00."
    sent = server.bodies[-1][1]["messages"]
    calls = {c["function"]["name"]: c["id"] for c in sent[1]["tool_calls"]}
    assert len(set(calls.values())) == 2
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    assert sent[2]["tool_call_id"] == calls["get_time"]
    assert sent[3]["tool_call_id"] == calls["get_weather"]
    # the same conversation translates the same way every time
    httpx.post(proc.url + "/api/chat", json=body, timeout=10)
    assert server.bodies[-1][1]["messages"] == sent


def test_tool_results_without_names_answer_the_calls_in_order(xl):
    scripts, server, _, proc = xl
    scripts.reply = Reply(whole=whole_chat("ok"))
    conversation = [
        *CONVERSATION[:2],
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "12:00"},
    ]
    body = {"model": "gpt-x", "stream": False, "messages": conversation}
    assert httpx.post(proc.url + "/api/chat", json=body, timeout=10).status_code == 200
    sent = server.bodies[-1][1]["messages"]
    assert [m["tool_call_id"] for m in sent[2:]] == [c["id"] for c in sent[1]["tool_calls"]]


def test_a_whole_reply_with_parallel_calls_comes_back_with_ids_the_next_turn_reuses(xl):
    scripts, server, _, proc = xl
    calls = [
        {
            "id": "srv-1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        },
        {"id": "srv-2", "type": "function", "function": {"name": "get_time", "arguments": '{"city":"Oslo"}'}},
    ]
    scripts.reply = Reply(whole=whole_chat(None, tool_calls=calls))
    client = ollama.Client(host=proc.url)
    first = client.chat(model="gpt-x", messages=CONVERSATION[:1], tools=[WEATHER, TIME], stream=False)
    got = first.message.tool_calls
    assert got is not None and [(c.function.name, dict(c.function.arguments)) for c in got] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"city": "Oslo"}),
    ]
    assert first.done_reason == "stop"
    raw = httpx.post(
        proc.url + "/api/chat",
        json={"model": "gpt-x", "stream": False, "messages": CONVERSATION[:1], "tools": [WEATHER, TIME]},
        timeout=10,
    ).json()
    assert [c["id"] for c in raw["message"]["tool_calls"]] == ["srv-1", "srv-2"]
    # the client sends the assistant turn back as it got it, then the results by name
    scripts.reply = Reply(whole=whole_chat("done"))
    turn = [
        CONVERSATION[0],
        raw["message"],
        {"role": "tool", "tool_name": "get_weather", "content": "18C"},
        {"role": "tool", "tool_name": "get_time", "content": "12:00"},
    ]
    httpx.post(proc.url + "/api/chat", json={"model": "gpt-x", "stream": False, "messages": turn}, timeout=10)
    sent = server.bodies[-1][1]["messages"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["srv-1", "srv-2"]
    assert [m["tool_call_id"] for m in sent[2:]] == ["srv-1", "srv-2"]


@pytest.mark.parametrize("per_write", [1, 4])
def test_streamed_tool_call_deltas_are_assembled_whatever_their_shape(xl, per_write):
    scripts, _, _, proc = xl
    # id and name only on each call's first delta, arguments split, the two calls interleaved
    events = [
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        chat_chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "get_time", "arguments": '{"ci'}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Os'}}]}),
        chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": 'ty": "Bergen"}'}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'lo"}'}}]}),
        chat_chunk({}, finish="tool_calls"),
        usage_chunk(5, 9),
    ]  # fmt: skip
    scripts.reply = Reply(events=events, per_write=per_write)
    body = {"model": "gpt-x", "messages": CONVERSATION[:1], "tools": [WEATHER, TIME]}
    lines = ndjson(httpx.post(proc.url + "/api/chat", json=body, timeout=10))
    with_calls = [line for line in lines if line.get("message", {}).get("tool_calls")]
    assert len(with_calls) == 1
    calls = with_calls[0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", "get_weather", {"city": "Oslo"}),
        ("b", "get_time", {"city": "Bergen"}),
    ]
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (5, 9)


# --------------------------------------------------------------------------- 5. thinking


def test_think_reaches_the_server_and_reasoning_comes_back_whole(xl):
    scripts, server, _, proc = xl
    scripts.reply = Reply(whole=whole_chat("blue", reasoning="light scatters"))
    body = {"model": "gpt-x", "stream": False, "think": True, "messages": CONVERSATION[:1]}
    reply = httpx.post(proc.url + "/api/chat", json=body, timeout=10).json()
    assert reply["message"] == {"role": "assistant", "content": "blue", "thinking": "light scatters"}
    assert server.bodies[-1][1]["chat_template_kwargs"] == {"enable_thinking": True}
    generate = {"model": "gpt-x", "stream": False, "think": "high", "prompt": "why?"}
    scripts.reply = Reply(whole=whole_chat("blue", reasoning_content="rayleigh"))
    reply = httpx.post(proc.url + "/api/generate", json=generate, timeout=10).json()
    assert (reply["response"], reply["thinking"]) == ("blue", "rayleigh")
    assert server.bodies[-1][1]["reasoning_effort"] == "high"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_streamed_reasoning_becomes_thinking_on_both_routes(xl, field):
    scripts, _, _, proc = xl
    events = [
        chat_chunk({"role": "assistant", field: "step one "}),
        chat_chunk({field: "step two"}),
        chat_chunk({"content": "blue"}),
        chat_chunk({}, finish="stop"),
        usage_chunk(),
    ]
    scripts.reply = Reply(events=events)
    chat = ndjson(
        httpx.post(
            proc.url + "/api/chat",
            json={"model": "gpt-x", "think": True, "messages": CONVERSATION[:1]},
            timeout=10,
        )
    )
    assert "".join(c["message"].get("thinking", "") for c in chat) == "step one step two"
    assert "".join(c["message"]["content"] for c in chat) == "blue"
    generate = ndjson(
        httpx.post(proc.url + "/api/generate", json={"model": "gpt-x", "prompt": "why?"}, timeout=10)
    )
    assert "".join(c.get("thinking", "") for c in generate) == "step one step two"
    assert "".join(c["response"] for c in generate) == "blue"


def test_think_false_turns_thinking_off_and_shows_none(xl):
    scripts, server, _, proc = xl
    events = [
        chat_chunk({"reasoning_content": "hidden"}),
        chat_chunk({"content": "blue"}, "stop"),
        usage_chunk(),
    ]
    scripts.reply = Reply(events=events)
    body = {"model": "gpt-x", "think": False, "messages": CONVERSATION[:1]}
    chat = ndjson(httpx.post(proc.url + "/api/chat", json=body, timeout=10))
    assert server.bodies[-1][1]["chat_template_kwargs"] == {"enable_thinking": False}
    assert not any("thinking" in c.get("message", {}) for c in chat)
    scripts.reply = Reply(whole=whole_chat("blue", reasoning_content="hidden"))
    whole = httpx.post(
        proc.url + "/api/generate",
        json={"model": "gpt-x", "think": False, "stream": False, "prompt": "x"},
        timeout=10,
    )
    assert "thinking" not in whole.json()


# --------------------------------------------------------------------------- 6. fields


def completion_events(*texts: str) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [
        {"object": "text_completion", "choices": [{"index": 0, "text": t, "finish_reason": None}]}
        for t in texts
    ]
    chunks.append(
        {"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    )
    chunks.append({"object": "text_completion", "choices": [], "usage": usage(4, len(texts))})
    return chunks


def test_raw_generate_uses_completions_with_the_prompt_as_it_is(xl):
    scripts, server, _, proc = xl
    prompt = "<start_of_turn>user\nhi<end_of_turn>\n"
    scripts.reply = Reply(events=completion_events("Hel", "lo"))
    body = {"model": "gpt-x", "raw": True, "prompt": prompt, "options": {"num_predict": 2, "top_k": 5}}
    lines = ndjson(httpx.post(proc.url + "/api/generate", json=body, timeout=10))
    path, sent = server.bodies[-1]
    assert path == "/v1/completions" and sent["prompt"] == prompt and "messages" not in sent
    assert (sent["max_tokens"], sent["top_k"]) == (2, 5)
    assert "".join(line["response"] for line in lines) == "Hello"
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 2
    scripts.reply = Reply(
        whole={
            "object": "text_completion",
            "choices": [{"index": 0, "text": "Hello", "finish_reason": "stop"}],
            "usage": usage(4, 2),
        }
    )
    whole = httpx.post(proc.url + "/api/generate", json={**body, "stream": False}, timeout=10).json()
    assert (whole["response"], whole["done"], whole["prompt_eval_count"]) == ("Hello", True, 4)


@pytest.mark.parametrize(
    ("route", "extra", "named"),
    [
        ("/api/chat", {"options": {"num_ctx": 8192, "tfs_z": 1.0}}, "options.tfs_z"),
        ("/api/chat", {"options": {"no_such_option": 1}}, "options.no_such_option"),
        ("/api/embed", {"options": {"num_ctx": 8192, "temperature": 1}}, "options.temperature"),
        ("/api/generate", {"template": "{{ .Prompt }}"}, "template"),
        ("/api/generate", {"context": [1, 2, 3]}, "context"),
        ("/api/generate", {"raw": True, "system": "be brief"}, "system"),
        ("/api/embed", {"truncate": True}, "truncate"),
        ("/api/chat", {"format": "yaml"}, "format"),
    ],
)
def test_a_field_that_cannot_be_translated_is_refused_by_name(xl, route, extra, named):
    _, server, _, proc = xl
    bases: dict[str, dict[str, Any]] = {
        "/api/chat": {"messages": CONVERSATION[:1]},
        "/api/generate": {"prompt": "x"},
    }
    base = bases.get(route, {"input": "x"})
    reply = httpx.post(
        proc.url + route, json={"model": "gpt-x", "stream": False, **base, **extra}, timeout=10
    )
    assert reply.status_code == 400
    assert f"'{named}'" in reply.json()["error"]
    assert server.bodies == [] and in_flight(proc.url) == 0
    # the same field on a model Ollama serves goes through untouched
    same = httpx.post(
        proc.url + route, json={"model": "llama3", "stream": False, **base, **extra}, timeout=10
    )
    assert same.status_code == 200, same.text


LOAD_TIME = {"num_ctx": 8192, "num_gpu": 99, "num_thread": 8, "num_batch": 512, "use_mmap": True}
LOAD_TIME_ALL = {**LOAD_TIME, "use_mlock": False, "numa": False, "low_vram": False, "main_gpu": 0}


@pytest.mark.parametrize("stream", [False, True])
def test_load_time_options_are_ignored_on_an_openai_server_and_the_reply_names_them(xl, stream):
    # Open WebUI and LangChain send num_ctx with every request: an OpenAI-compatible server fixed
    # it when it started, so the request is served without it, and the reply says so.
    scripts, server, (first, second), proc = xl
    scripts.reply = (
        Reply(events=[chat_chunk({"content": "Hi"}, "stop"), usage_chunk()])
        if stream
        else Reply(whole=whole_chat("Hi"))
    )
    options = {**LOAD_TIME_ALL, "temperature": 0.5}
    body = {"model": "gpt-x", "stream": stream, "messages": CONVERSATION[:1], "options": options}
    reply = httpx.post(proc.url + "/api/chat", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-router-ignored"] == ",".join(LOAD_TIME_ALL)
    assert "Hi" in "".join(line["message"]["content"] for line in ndjson(reply))
    (path, sent), *_ = server.bodies
    assert path == "/v1/chat/completions" and sent["temperature"] == 0.5
    assert not set(LOAD_TIME_ALL) & set(sent) and "options" not in sent
    scripts.reply = Reply(
        whole={
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
            "usage": usage(2, 0),
        }
    )
    embed = httpx.post(
        proc.url + "/api/embed",
        json={"model": "gpt-x", "input": "x", "options": {"num_ctx": 512}},
        timeout=10,
    )
    assert embed.status_code == 200 and embed.headers["x-router-ignored"] == "num_ctx"
    assert embed.json()["embeddings"] == [[0.5]]
    # on an Ollama server they are real settings: sent as given, and nothing is named
    ollama_body = {**body, "model": "llama3", "options": LOAD_TIME}
    direct = httpx.post(proc.url + "/api/chat", json=ollama_body, timeout=10)
    assert direct.status_code == 200 and "x-router-ignored" not in direct.headers
    forwarded = [b for fake in (first, second) for b in fake.stats.bodies_for("/api/chat")]
    assert forwarded and forwarded[-1]["options"] == LOAD_TIME
    # without load-time options, no header
    plain = httpx.post(proc.url + "/api/chat", json={**body, "options": {"temperature": 0.5}}, timeout=10)
    assert plain.status_code == 200 and "x-router-ignored" not in plain.headers
    assert in_flight(proc.url) == 0


# --------------------------------------------------------------------------- 7. load / unload


def ps_names(proc: Any) -> list[str]:
    return [m["name"] for m in httpx.get(proc.url + "/api/ps", timeout=10).json()["models"]]


def test_unload_reaches_every_ollama_server_and_ps_shows_it(xl):
    _, _, (first, second), proc = xl
    assert ps_names(proc) == ["llama3:latest"]
    reply = httpx.post(proc.url + "/api/generate", json={"model": "llama3", "keep_alive": 0}, timeout=10)
    lines = ndjson(reply)
    assert len(lines) == 1 and lines[0]["done_reason"] == "unload" and lines[0]["done"] is True
    assert lines[0]["response"] == ""
    assert first.config.loaded == [] and second.config.loaded == []
    assert ps_names(proc) == []
    load = httpx.post(
        proc.url + "/api/chat", json={"model": "llama3", "messages": [], "stream": False}, timeout=10
    )
    assert load.status_code == 200
    assert load.json() == {
        **load.json(),
        "done_reason": "load",
        "done": True,
        "message": {"role": "assistant", "content": ""},
    }
    assert first.config.loaded == ["llama3:latest"] and second.config.loaded == ["llama3:latest"]
    assert ps_names(proc) == ["llama3:latest"]
    assert in_flight(proc.url) == 0
    wait_db_totals(Totals())  # nothing generated, nothing recorded


def test_load_and_unload_of_an_openai_only_model_generate_nothing(xl):
    _, server, _, proc = xl
    for body, reason in (
        ({"model": "gpt-x", "prompt": "", "stream": False}, "load"),
        ({"model": "gpt-x", "keep_alive": "0s", "stream": False}, "unload"),
        ({"model": "gpt-x", "messages": [], "keep_alive": 0, "stream": False}, "unload"),
    ):
        route = "/api/chat" if "messages" in body else "/api/generate"
        reply = httpx.post(proc.url + route, json=body, timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.json()["done_reason"] == reason and reply.json()["done"] is True
    assert server.bodies == []
    wait_until(lambda: in_flight(proc.url) == 0)
    wait_db_totals(Totals())
