"""Anthropic requests as OpenAI chat-completions and Ollama /api/chat requests (convert.py)."""

from __future__ import annotations

from typing import Any

import pytest

from routing.protocols.anthropic import convert

TOOL = {"name": "get", "description": "d", "input_schema": {"type": "object", "properties": {}}}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "q"},
    {
        "role": "assistant",
        "content": [
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "let me look"},
            {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"a": 1}},
            {"type": "tool_use", "id": "toolu_2", "name": "put", "input": {}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "done"},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "x"}],
                "is_error": True,
            },
            {"type": "text", "text": "now?"},
        ],
    },
]


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "client-name", "max_tokens": 9, "messages": CONVERSATION, **fields}


def test_a_conversation_with_tool_calls_and_results_for_an_openai_server() -> None:
    body = convert.openai_request(request(system="sys"), "server-name", stream=True, max_tokens=None)
    assert body["model"] == "server-name" and body["max_tokens"] == 9
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "let me look",
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}},
                {"id": "toolu_2", "type": "function", "function": {"name": "put", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_2", "content": "done"},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: x"},
        {"role": "user", "content": "now?"},
    ]


def test_the_same_conversation_for_an_ollama_server_pairs_results_by_tool_name() -> None:
    body = convert.ollama_request(request(), "server-name", stream=False, max_tokens=1)
    assert body["options"] == {"num_predict": 1}  # count_tokens' one-token generation
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "let me look",
            "tool_calls": [
                {"id": "toolu_1", "function": {"name": "get", "arguments": {"a": 1}}},
                {"id": "toolu_2", "function": {"name": "put", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "done", "tool_call_id": "toolu_2", "tool_name": "put"},
        {"role": "tool", "content": "Error: x", "tool_call_id": "toolu_1", "tool_name": "get"},
        {"role": "user", "content": "now?"},
    ]


def test_text_parts_stay_in_order_around_a_tool_result_and_images_become_parts() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}}
    content = [
        {"type": "text", "text": "a"},
        image,
        {"type": "tool_result", "tool_use_id": "t"},
        {"type": "text", "text": "b"},
    ]
    data = {"model": "m", "messages": [{"role": "user", "content": content}]}
    assert convert.openai_messages(data) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
            ],
        },
        {"role": "tool", "tool_call_id": "t", "content": ""},
        {"role": "user", "content": "b"},
    ]
    assert convert.ollama_messages(data) == [
        {"role": "user", "content": "a", "images": ["QUJD"]},
        {"role": "tool", "content": "", "tool_call_id": "t"},
        {"role": "user", "content": "b"},
    ]


@pytest.mark.parametrize(
    ("choice", "openai", "ollama_tools", "ignored"),
    [
        (None, None, ["get", "other"], []),
        ({"type": "auto"}, "auto", ["get", "other"], []),
        ({"type": "any"}, "required", ["get", "other"], ["tool_choice"]),
        (
            {"type": "tool", "name": "other"},
            {"type": "function", "function": {"name": "other"}},
            ["other"],
            ["tool_choice"],
        ),
        ({"type": "none"}, "none", None, []),
    ],
)
def test_tool_choice_on_each_server_kind(
    choice: Any, openai: Any, ollama_tools: Any, ignored: list[str]
) -> None:
    data = request(tools=[TOOL, {**TOOL, "name": "other"}], tool_choice=choice)
    body = convert.openai_request(data, "m", stream=False, max_tokens=None)
    assert body.get("tool_choice") == openai
    assert body["tools"][0] == {
        "type": "function",
        "function": {"name": "get", "parameters": TOOL["input_schema"], "description": "d"},
    }
    sent = convert.ollama_request(data, "m", stream=False, max_tokens=None).get("tools")
    assert (None if sent is None else [t["function"]["name"] for t in sent]) == ollama_tools
    assert convert.ollama_ignored(data) == ignored


def test_parallel_tool_calls_switched_off() -> None:
    data = request(tools=[TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert convert.openai_request(data, "m", stream=False, max_tokens=None)["parallel_tool_calls"] is False
    assert convert.ollama_ignored(data) == ["tool_choice.disable_parallel_tool_use"]


@pytest.mark.parametrize(
    ("thinking", "output_config", "kwargs", "effort", "think"),
    [
        (None, None, None, None, None),
        ({"type": "disabled"}, None, {"enable_thinking": False}, None, False),
        ({"type": "enabled", "budget_tokens": 1024}, None, {"enable_thinking": True}, "low", True),
        ({"type": "enabled", "budget_tokens": 10000}, None, {"enable_thinking": True}, "medium", True),
        ({"type": "enabled", "budget_tokens": 32000}, None, {"enable_thinking": True}, "high", True),
        ({"type": "adaptive"}, {"effort": "xhigh"}, {"enable_thinking": True}, "high", True),
        (None, {"effort": "low"}, None, "low", None),
    ],
)
def test_thinking_and_effort(thinking: Any, output_config: Any, kwargs: Any, effort: Any, think: Any) -> None:
    data = request(thinking=thinking, output_config=output_config)
    body = convert.openai_request(data, "m", stream=False, max_tokens=None)
    assert body.get("chat_template_kwargs") == kwargs and body.get("reasoning_effort") == effort
    assert convert.ollama_request(data, "m", stream=False, max_tokens=None).get("think") == think


def test_a_json_schema_output_format_and_the_sampling_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    data = request(
        output_config={"format": {"type": "json_schema", "schema": schema}},
        temperature=0.1,
        top_p=0.2,
        top_k=3,
        stop_sequences=["END"],
        metadata={"user_id": "u"},
    )
    body = convert.openai_request(data, "m", stream=False, max_tokens=None)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }
    assert (body["temperature"], body["top_p"], body["top_k"], body["stop"], body["user"]) == (
        0.1,
        0.2,
        3,
        ["END"],
        "u",
    )
    assert "stream_options" not in body
    sent = convert.ollama_request(data, "m", stream=True, max_tokens=None)
    assert sent["format"] == schema and sent["stream"] is True
    assert sent["options"] == {
        "num_predict": 9,
        "temperature": 0.1,
        "top_p": 0.2,
        "top_k": 3,
        "stop": ["END"],
    }
