"""What an Anthropic Messages body must look like before any server is asked (shapes.py)."""

from __future__ import annotations

from typing import Any

import pytest

from routing.core.errors import ApiError
from routing.protocols.anthropic import shapes


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **fields}


def refused(data: dict[str, Any], *, count: bool = False) -> str:
    with pytest.raises(ApiError) as caught:
        (shapes.check_count if count else shapes.check_messages)(data)
    assert caught.value.status == 400
    return caught.value.message


def test_it_accepts_every_documented_block_and_field() -> None:
    shapes.check_messages(
        body(
            system=[{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
            stop_sequences=["x"],
            temperature=0.2,
            top_p=0.5,
            top_k=3,
            stream=True,
            metadata={"user_id": "u"},
            tools=[{"name": "t", "description": "d", "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": "t", "disable_parallel_tool_use": True},
            thinking={"type": "enabled", "budget_tokens": 1024},
            output_config={"effort": "max", "format": {"type": "json_schema", "schema": {}}},
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "a"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "t", "signature": "s"},
                        {"type": "redacted_thinking", "data": "x"},
                        {"type": "tool_use", "id": "c1", "name": "t", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "c1", "content": "r", "is_error": True},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        },
                    ],
                },
            ],
        )
    )
    shapes.check_count({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "'max_tokens' is required"),
        (body(max_tokens=0), "'max_tokens' must be a positive integer"),
        (body(messages=[]), "'messages' is required (a non-empty list)"),
        (
            body(messages=[{"role": "system", "content": "x"}]),
            "'messages[0].role' must be 'user' or 'assistant'",
        ),
        (body(messages=[{"role": "user"}]), "'messages[0].content' is required"),
        (body(stop_sequences="x"), "'stop_sequences' must be a list of strings"),
        (body(top_k=-1), "'top_k' must be a non-negative integer"),
        (body(temperature="hot"), "'temperature' must be a number"),
        (body(stream="yes"), "'stream' must be a boolean"),
        (body(system=[{"type": "text"}]), "'system[0].text' is required"),
        (body(thinking={"type": "enabled"}), "'thinking.budget_tokens' is required when thinking is enabled"),
        (body(thinking={"type": "sometimes"}), "'thinking.type' must be one of"),
        (
            body(tool_choice={"type": "tool", "name": "x"}),
            "'tool_choice.name' must name one of the request's tools",
        ),
        (
            body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "'tools[0].type' 'web_search_20250305'",
        ),
        (body(tools=[{"description": "no name"}]), "'tools[0].name' is required"),
    ],
)
def test_it_names_the_first_wrong_field(data: dict[str, Any], message: str) -> None:
    assert refused(data).startswith(message)


@pytest.mark.parametrize(
    ("role", "block", "message"),
    [
        (
            "user",
            {"type": "document", "source": {}},
            "'messages[0].content[0].type' 'document' is not supported",
        ),
        ("user", {"text": "no type"}, "'messages[0].content[0].type' is required"),
        (
            "user",
            {"type": "tool_use", "id": "a", "name": "b", "input": {}},
            "'messages[0].content[0]' a tool_use",
        ),
        ("assistant", {"type": "tool_result", "tool_use_id": "a"}, "'messages[0].content[0]' a tool_result"),
        ("assistant", {"type": "image", "source": {}}, "'messages[0].content[0]' an image block"),
        (
            "user",
            {"type": "thinking", "thinking": "x", "signature": "s"},
            "'messages[0].content[0]' a thinking block is only valid in an assistant message",
        ),
        (
            "user",
            {"type": "redacted_thinking", "data": "x"},
            "'messages[0].content[0]' a redacted_thinking block is only valid in an assistant message",
        ),
        (
            "user",
            {"type": "image", "source": {"type": "url", "url": "http://x"}},
            "'messages[0].content[0].source.type' must be 'base64'",
        ),
        (
            "user",
            {"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "AA"}},
            "'messages[0].content[0].source.media_type' must be one of",
        ),
        (
            "user",
            {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "image", "source": {}}]},
            "'messages[0].content[0].content[0]' must be a text block",
        ),
        ("user", {"type": "tool_result", "tool_use_id": ""}, "'messages[0].content[0].tool_use_id' must be"),
        (
            "assistant",
            {"type": "tool_use", "id": "a", "name": "b", "input": "{}"},
            "'messages[0].content[0].input'",
        ),
    ],
)
def test_it_refuses_blocks_it_cannot_translate_by_their_path(
    role: str, block: dict[str, Any], message: str
) -> None:
    assert refused(body(messages=[{"role": role, "content": [block]}])).startswith(message)


def test_count_tokens_takes_no_max_tokens_but_the_same_messages() -> None:
    shapes.check_count({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert refused({"model": "m", "messages": []}, count=True).startswith("'messages' is required")


def test_fields_it_does_not_know_are_named_not_refused() -> None:
    data = body(
        container="c", context_management={"edits": []}, cache_control={"type": "ephemeral"}, speed=None
    )
    shapes.check_messages(data)
    assert shapes.ignored_fields(data) == "container,context_management"
    assert shapes.ignored_fields(body(service_tier="auto", speed="fast")) == ""


def test_ignored_field_names_that_are_not_tokens_are_shown_as_a_question_mark() -> None:
    # A name with CR/LF once reached the header as is: Django refused it, the client got a 500.
    data = body(**{"a\r\nX-Evil: 1": 1, "caf\u00e9": 2, "ok_name": 3})
    assert shapes.ignored_fields(data) == "?,?,ok_name"


def test_the_ignored_header_is_bounded() -> None:
    data = body(**{f"field{i:04d}": 1 for i in range(1000)})
    value = shapes.ignored_fields(data)
    assert len(value) <= shapes.IGNORED_MAX
    assert value.startswith("field0000,field0001,") and value.endswith(",...")
    assert "field0999" not in value


def test_a_tool_result_must_answer_a_tool_use_of_the_message_before() -> None:
    call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}

    def result(tool_use_id: str) -> dict[str, Any]:
        return {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": "ok"}],
        }

    ask = {"role": "user", "content": "go"}
    shapes.check_messages(body(messages=[ask, {"role": "assistant", "content": [call]}, result("toolu_1")]))
    alone = refused(body(messages=[result("toolu_1")]))
    assert alone.startswith("'messages[0].content[0].tool_use_id'") and "answers no tool_use" in alone
    wrong = refused(body(messages=[ask, {"role": "assistant", "content": [call]}, result("toolu_2")]))
    assert "messages[2].content[0].tool_use_id" in wrong
    later = [
        ask,
        {"role": "assistant", "content": [call]},
        result("toolu_1"),
        {"role": "assistant", "content": "x"},
    ]
    assert "messages[4]" in refused(body(messages=[*later, result("toolu_1")]), count=False)
