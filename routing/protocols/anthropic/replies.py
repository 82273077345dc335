"""Whole replies of OpenAI-compatible and Ollama servers as Anthropic `message` objects.

Reply shape (Anthropic's reference, Messages): {"id": "msg_…", "type": "message", "role":
"assistant", "model": <the client's model name>, "content": [thinking?, text?, tool_use*],
"stop_reason", "stop_sequence", "usage": {"input_tokens", "output_tokens", …}}. Usage is the
server's own count (OpenAI `usage.prompt_tokens`/`completion_tokens`, Ollama
`prompt_eval_count`/`eval_count`), the same numbers the router accounts.

stop_reason: a tool call in the reply is `tool_use`; OpenAI `length` / Ollama `length` is
`max_tokens`; `content_filter` is `refusal`; a stop the server says came from one of the
request's stop sequences (vLLM's `stop_reason` string) is `stop_sequence` with that sequence;
anything else `end_turn`. llama.cpp and Ollama do not say which stop string matched, so a
stop sequence reached there reads as `end_turn`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from routing.engine.accounting import Counts
from routing.engine.attempt import BodyReader
from routing.protocols.common.streams import ollama_counts, openai_counts


def message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def tool_id() -> str:
    """An id for a tool call a server sent without one (Ollama)."""
    return "toolu_" + os.urandom(12).hex()


def usage(counts: Counts | None) -> dict[str, int]:
    prompt, completion = (counts.prompt, counts.completion) if counts is not None else (0, 0)
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def arguments(value: Any) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` is (OpenAI sends JSON text;
    text that is not a JSON object is kept under "raw" rather than lost)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip():
        return {}
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return {"raw": value}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def stop_reason(reason: Any, *, tools: bool, matched: Any, stops: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished reply (see the module docstring)."""
    if tools or reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if reason == "content_filter":
        return "refusal", None
    if isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return "end_turn", None


def message(
    model: str, content: list[dict[str, Any]], reason: tuple[str, str | None], counts: Counts | None
) -> dict[str, Any]:
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason[0],
        "stop_sequence": reason[1],
        "usage": usage(counts),
    }


def _content(
    thinking: str, said: str, calls: list[dict[str, Any]], keep_thinking: bool
) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if thinking and keep_thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if said:
        content.append({"type": "text", "text": said})
    content.extend(calls)
    return content


def _load(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _tool_uses(listed: Any) -> list[dict[str, Any]]:
    """A reply message's `tool_calls` (OpenAI's and Ollama's alike: `id`, `function.name`,
    `function.arguments` as JSON text or an object) as Anthropic tool_use blocks; a call
    without a `function` object is left out, a missing id is made up."""
    calls: list[dict[str, Any]] = []
    for call in listed if isinstance(listed, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            calls.append(
                {
                    "type": "tool_use",
                    "id": text(call.get("id")) or tool_id(),
                    "name": text(fn.get("name")),
                    "input": arguments(fn.get("arguments")),
                }
            )
    return calls


def from_openai(model: str, stops: list[str], *, keep_thinking: bool) -> BodyReader:
    """A whole chat-completion reply -> an Anthropic message. Raises ValueError on a body that
    is not a chat completion (the engine answers 502)."""

    def read(body: bytes) -> tuple[bytes, Counts | None]:
        obj = _load(body)
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ValueError("not a chat completion")
        choice = choices[0]
        counts = openai_counts(obj)
        said = choice.get("message")
        said = said if isinstance(said, dict) else {}
        calls = _tool_uses(said.get("tool_calls"))
        thinking = text(said.get("reasoning_content")) or text(said.get("reasoning"))
        content = _content(thinking, text(said.get("content")), calls, keep_thinking)
        reason = stop_reason(
            choice.get("finish_reason"), tools=bool(calls), matched=choice.get("stop_reason"), stops=stops
        )
        return json.dumps(message(model, content, reason, counts)).encode(), counts

    return read


def from_ollama(model: str, *, keep_thinking: bool) -> BodyReader:
    """A whole /api/chat reply -> an Anthropic message (ValueError as from_openai)."""

    def read(body: bytes) -> tuple[bytes, Counts | None]:
        obj = _load(body)
        said = obj.get("message") if isinstance(obj, dict) else None
        if not isinstance(said, dict):
            raise ValueError("not a chat reply")
        counts = ollama_counts(obj)
        calls = _tool_uses(said.get("tool_calls"))
        content = _content(text(said.get("thinking")), text(said.get("content")), calls, keep_thinking)
        reason = stop_reason(obj.get("done_reason"), tools=bool(calls), matched=None, stops=[])
        return json.dumps(message(model, content, reason, counts)).encode(), counts

    return read


def count_from_openai(body: bytes) -> tuple[bytes, Counts | None]:
    """count_tokens, answered from a one-token generation's usage: {"input_tokens": n}."""
    counts = openai_counts(_load(body))
    if counts is None:
        raise ValueError("the reply carries no usage")
    return json.dumps({"input_tokens": counts.prompt}).encode(), counts


def count_from_ollama(body: bytes) -> tuple[bytes, Counts | None]:
    counts = ollama_counts(_load(body))
    if counts is None:
        raise ValueError("the reply carries no counts")
    return json.dumps({"input_tokens": counts.prompt}).encode(), counts
