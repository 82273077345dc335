"""The official `anthropic` client against the real router, in front of an OpenAI-compatible
(llama.cpp-like) fake and an Ollama fake: each test runs against both kinds.

The fakes answer "tok0 tok1 ... " (one chunk per token), report the words of the messages plus
one as the prompt's tokens, call the first tool they are given with {"x": 1}, and think
("think0 think1 ") when asked to (bench/fake_backend.py)."""

from __future__ import annotations

import calendar
import json
import re
import time
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import clear_of_minute_edge, wait_until
from tests.integration.helpers import in_flight
from tests.integration.test_keys import make_key
from tests.reliability.support import RawRequest, Totals, wait_db_totals

KINDS = {
    # kind -> (the fake's model, the name the client asks for, the upstream chat path)
    "openai": ("qwen-coder", "qwen-coder", "/v1/chat/completions"),
    "ollama": ("llama3:latest", "llama3", "/api/chat"),
}
TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _body(caught: Any) -> Any:
    """The parsed error body of a caught anthropic.APIStatusError."""
    return caught.value.body


class Served:
    """One fake backend of `kind` (5 tokens per reply) behind a router, and a client on it."""

    def __init__(self, kind: str, fakes: Any, endpoint: Any, router: Any, **env: str) -> None:
        self.kind = kind
        fake_model, self.model, self.path = KINDS[kind]
        self.fake = fakes(kind=kind, models=[fake_model], tokens=5)
        url = self.fake.url + ("/v1" if kind == "openai" else "")
        endpoint(url, name=f"gpu-{kind}", kind=kind, max_concurrent_connections=4)
        self.server = router(**env)
        self.client: Any = anthropic.Anthropic(base_url=self.server.url, api_key="unused", max_retries=0)

    def sent(self) -> dict[str, Any]:
        """The last body the backend received on its chat route."""
        return self.fake.stats.bodies_for(self.path)[-1]  # type: ignore[no-any-return]

    def sent_messages(self) -> list[dict[str, Any]]:
        return self.sent()["messages"]  # type: ignore[no-any-return]


@pytest.fixture(params=sorted(KINDS))
def served(request, fakes, endpoint, router) -> Served:
    return Served(request.param, fakes, endpoint, router)


def test_it_answers_a_whole_message_with_the_servers_usage(served):
    reply = served.client.messages.create(
        model=served.model,
        max_tokens=100,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "why is the sky blue"}],
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20},  # (gone from this client's signature)
        metadata={"user_id": "u-1"},
    )
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.model == served.model
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    # the fake reports the words of every message plus one: "be brief" + 5 words + 1
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (8, 5)
    sent = served.sent()
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "why is the sky blue"},
    ]
    if served.kind == "openai":
        assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["top_k"]) == (100, 0.5, 0.9, 20)
        assert sent["user"] == "u-1" and sent["stream"] is False
    else:
        assert sent["options"] == {"num_predict": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 20}
        assert sent["stream"] is False


def test_it_streams_the_event_sequence_and_the_stream_helper_assembles_it(served):
    with served.client.messages.stream(
        model=served.model, max_tokens=100, messages=[{"role": "user", "content": "hi there"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "tok0 tok1 tok2 tok3 tok4 " and len(texts) == 5
    assert final.content[0].text == "tok0 tok1 tok2 tok3 tok4 "
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)
    events = list(
        served.client.messages.create(
            model=served.model, max_tokens=3, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
    )
    kinds = [e.type for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 3
    raw = httpx.post(
        served.server.url + "/v1/messages",
        json={
            "model": served.model,
            "max_tokens": 2,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
        headers={"anthropic-version": "2023-06-01"},
        timeout=10,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    names = [line.split(": ", 1)[1] for line in raw.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    if served.kind == "openai":
        assert served.sent()["stream_options"] == {"include_usage": True}


def test_a_tool_call_round_trip_with_its_result(served):
    asked = [{"role": "user", "content": "weather in Paris?"}]
    reply = served.client.messages.create(model=served.model, max_tokens=50, tools=TOOLS, messages=asked)
    assert reply.stop_reason == "tool_use"
    (call,) = [b for b in reply.content if b.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", {"x": 1}) and call.id
    sent = served.sent()
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": TOOLS[0]["input_schema"],
                "description": "Weather in a city",
            },
        }
    ]
    # what a server kind cannot honour is named, as are fields the router does not know
    forced = served.client.messages.with_raw_response.create(
        model=served.model,
        max_tokens=50,
        tools=TOOLS,
        tool_choice={"type": "any"},
        messages=asked,
        extra_body={"context_management": {"edits": []}},
    )
    named = "context_management" + (",tool_choice" if served.kind == "ollama" else "")
    assert forced.headers["x-router-ignored"] == named
    if served.kind == "openai":
        assert served.sent()["tool_choice"] == "required"
    assert "context_management" not in served.sent()
    # the streamed call: its own block, the input as JSON deltas
    with served.client.messages.stream(
        model=served.model, max_tokens=50, tools=TOOLS, messages=asked
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["tool_use"] and final.content[0].input == {"x": 1}
    assert any(e.type == "input_json" for e in events) and final.stop_reason == "tool_use"
    # the result goes back; the server sees it paired with its call
    follow = [
        *asked,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": [{"type": "text", "text": "sunny"}],
                },
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
    ]
    done = served.client.messages.create(
        model=served.model, max_tokens=50, tools=TOOLS, tool_choice={"type": "none"}, messages=follow
    )
    assert done.stop_reason == "end_turn" and done.content[0].text.startswith("tok0")
    messages = served.sent_messages()
    assert messages[0] == {"role": "user", "content": "weather in Paris?"}
    assert messages[3] == {"role": "user", "content": "and tomorrow?"}
    if served.kind == "openai":
        assert messages[1]["tool_calls"] == [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"x": 1}'}}
        ]
        assert messages[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
        assert served.sent()["tool_choice"] == "none"
    else:
        assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"x": 1}}
        assert messages[2] == {
            "role": "tool",
            "content": "sunny",
            "tool_call_id": call.id,
            "tool_name": "get_weather",
        }
        assert "tools" not in served.sent()  # tool_choice none: no tools offered


def test_thinking_comes_first_in_its_own_block_and_can_be_switched_off(served):
    thinking = {"type": "enabled", "budget_tokens": 2048}
    reply = served.client.messages.create(
        model=served.model, max_tokens=100, thinking=thinking, messages=[{"role": "user", "content": "hm"}]
    )
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == "think0 think1 "
    if served.kind == "openai":
        assert served.sent()["chat_template_kwargs"] == {"enable_thinking": True}
        assert served.sent()["reasoning_effort"] == "low"
    else:
        assert served.sent()["think"] is True
    with served.client.messages.stream(
        model=served.model, max_tokens=100, thinking=thinking, messages=[{"role": "user", "content": "hm"}]
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [(e.index, e.content_block.type) for e in events if e.type == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text")]
    assert final.content[0].thinking == "think0 think1 " and final.content[1].text.startswith("tok0")
    off = served.client.messages.create(
        model=served.model,
        max_tokens=100,
        thinking={"type": "disabled"},
        messages=[{"role": "user", "content": "hm"}],
    )
    assert [b.type for b in off.content] == ["text"]
    if served.kind == "openai":
        assert served.sent()["chat_template_kwargs"] == {"enable_thinking": False}
    else:
        assert served.sent()["think"] is False


def test_images_stop_sequences_and_history_thinking_reach_the_server(served):
    served.client.messages.create(
        model=served.model,
        max_tokens=10,
        stop_sequences=["END", "STOP"],
        messages=[
            {"role": "user", "content": "first"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "ok"},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                ],
            },
        ],
    )
    sent = served.sent()
    assistant, user = sent["messages"][1], sent["messages"][2]
    if served.kind == "openai":
        assert sent["stop"] == ["END", "STOP"]
        assert assistant == {"role": "assistant", "content": "ok", "reasoning_content": "hmm"}
        assert user["content"] == [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        ]
    else:
        assert sent["options"]["stop"] == ["END", "STOP"]
        assert assistant == {"role": "assistant", "content": "ok", "thinking": "hmm"}
        assert user == {"role": "user", "content": "what is this?", "images": [PNG]}


def test_count_tokens_is_the_servers_prompt_count(served):
    counted = served.client.messages.count_tokens(
        model=served.model, system="be brief", messages=[{"role": "user", "content": "one two three"}]
    )
    assert counted.input_tokens == 2 + 3 + 1  # what the fake reports for this prompt
    sent = served.sent()
    assert (sent.get("max_tokens") or sent.get("options", {}).get("num_predict")) == 1


def test_errors_are_anthropics_exceptions(served):
    client, model = served.client, served.model
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=model, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert _body(bad)["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in _body(bad)["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as missing:
        client.post(
            "/v1/messages",
            body={"model": model, "messages": [{"role": "user", "content": "x"}]},
            cast_to=object,
        )
    assert _body(missing) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' is required"},
    }
    with pytest.raises(anthropic.BadRequestError) as url_image:
        client.messages.create(
            model=model,
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}],
                }
            ],
        )
    assert "source.type" in _body(url_image)["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert _body(unknown)["type"] == "error" and _body(unknown)["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])
    assert (
        served.fake.stats.snapshot()["requests"].get(served.path, 0) == 0
    )  # refused before any server was asked
    wrong_method = httpx.get(served.server.url + "/v1/messages", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"


def test_a_servers_own_refusal_comes_back_in_anthropics_shape(fakes, endpoint, router):
    fake = fakes(kind="openai", models=["qwen-coder"], reject_fields=["top_k"])
    endpoint(fake.url + "/v1", kind="openai")
    client: Any = anthropic.Anthropic(base_url=router().url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(
            model="qwen-coder",
            max_tokens=5,
            extra_body={"top_k": 3},
            messages=[{"role": "user", "content": "x"}],
        )
    assert _body(refused)["type"] == "error" and "top_k" in _body(refused)["error"]["message"]


def test_keys_quotas_and_x_api_key(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=2)
    endpoint(fake.url)
    key = make_key("claude-code", "--rpm", "1")
    server = router(ROUTER_API_KEY="operator-key")
    client: Any = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)
    clear_of_minute_edge()
    hello = [{"role": "user", "content": "x"}]
    first = client.messages.with_raw_response.create(model="llama3", max_tokens=5, messages=hello)
    assert first.parse().usage.output_tokens == 2
    # Anthropic's own rate limit headers, not OpenAI's: the reset is the RFC 3339 UTC refill time
    assert first.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = first.headers["anthropic-ratelimit-requests-reset"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z", reset)
    assert 0 < calendar.timegm(time.strptime(reset, "%Y-%m-%dT%H:%M:%SZ")) - time.time() <= 60
    assert not any(name.startswith("x-ratelimit") for name in first.headers)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="llama3", max_tokens=5, messages=hello)
    assert _body(limited)["error"]["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    with pytest.raises(anthropic.AuthenticationError) as unknown:
        wrong: Any = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
        wrong.messages.create(model="llama3", max_tokens=5, messages=hello)
    assert _body(unknown)["error"]["type"] == "authentication_error"
    operator: Any = anthropic.Anthropic(base_url=server.url, api_key="operator-key", max_retries=0)
    assert (
        operator.messages.create(model="llama3", max_tokens=5, messages=hello).content[0].text == "tok0 tok1 "
    )


def test_every_token_is_accounted_as_the_server_reported_it(served):
    for stream in (False, True, False, True):
        body = {"model": served.model, "max_tokens": 50, "messages": [{"role": "user", "content": "a b c"}]}
        if stream:
            with served.client.messages.stream(**body) as s:
                s.until_done()
        else:
            served.client.messages.create(**body)
    served.client.messages.count_tokens(model=served.model, messages=[{"role": "user", "content": "a b"}])
    prompt, completion = (
        served.fake.stats.prompt_tokens_reported,
        served.fake.stats.completion_tokens_reported,
    )
    assert (prompt, completion) == (4 * 4 + 3, 4 * 5 + 1)
    wait_db_totals(Totals(prompt, completion, 5, 0), timeout=15)


def test_a_client_hanging_up_mid_stream_gives_the_slot_back(fakes, endpoint, router):
    for kind in sorted(KINDS):
        fake_model = KINDS[kind][0]
        fake = fakes(kind=kind, models=[fake_model], tokens=200, delay=0.05)
        endpoint(fake.url + ("/v1" if kind == "openai" else ""), name=f"slow-{kind}", kind=kind)
    server = router()
    for kind in sorted(KINDS):
        model = KINDS[kind][1]
        body = {
            "model": model,
            "max_tokens": 500,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
        raw = RawRequest.post_json(server, "/v1/messages", body)
        raw.read_until(b"text_delta", 2)
        assert in_flight(server.url) == 1
        raw.close()
        wait_until(lambda: in_flight(server.url) == 0, timeout=10)
    wait_db_totals(Totals(0, 0, 2, 2), timeout=15)


def test_a_server_failing_mid_stream_ends_the_stream_with_an_error_event(fakes, endpoint, router):
    fake = fakes(kind="openai", models=["qwen-coder"], tokens=10, fault="die_midstream", fault_after=2)
    endpoint(fake.url + "/v1", kind="openai")
    server = router()
    body = {
        "model": "qwen-coder",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    reply = httpx.post(server.url + "/v1/messages", json=body, timeout=10)
    assert reply.status_code == 200
    events = [block for block in reply.text.split("\n\n") if block.strip()]
    assert events[-1].startswith("event: error\n")
    error = json.loads(events[-1].split("data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "message_stop" not in reply.text
    client: Any = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    with (
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as s,
    ):
        s.until_done()


def test_a_full_fleet_is_an_overloaded_error_with_retry_after(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=100, delay=0.05)
    endpoint(fake.url, max_concurrent_connections=1)
    server = router(ROUTER_QUEUE_TIMEOUT="0.5")
    body = {
        "model": "llama3",
        "max_tokens": 500,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    holding = RawRequest.post_json(server, "/v1/messages", body)
    holding.read_until(b"text_delta")  # the one slot is taken
    client: Any = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as busy:
        client.messages.create(model="llama3", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert busy.value.status_code == 503 and _body(busy)["error"]["type"] == "overloaded_error"
    assert busy.value.response.headers["retry-after"] == "5"
    holding.close()
    wait_until(lambda: in_flight(server.url) == 0, timeout=10)


def test_an_unknown_field_named_with_a_line_break_is_no_500(fakes, endpoint, router):
    # The ignored field's name went into X-Router-Ignored as is; Django refused the CR/LF: a 500.
    fake = fakes(kind="openai", models=["qwen-coder"], tokens=1)
    endpoint(fake.url + "/v1", kind="openai")
    server = router()
    body = {"model": "qwen-coder", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    reply = httpx.post(server.url + "/v1/messages", json={**body, "a\r\nX-Evil: 1": 1}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Router-Ignored"] == "?" and "X-Evil" not in reply.headers
    assert in_flight(server.url) == 0
