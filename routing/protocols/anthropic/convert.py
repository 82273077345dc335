"""An Anthropic Messages request as an OpenAI chat-completions request and as an Ollama /api/chat
request. Runs only on bodies shapes.py accepted; never raises.

Mapping (Anthropic's reference, Messages; OpenAI's chat completions; Ollama's docs/api.md),
Anthropic -> OpenAI-compatible ; Ollama:
- `system` (string or text blocks) -> a first `system` message ; the same
- text / image (base64) blocks -> `text` / `image_url` (data: URI) parts ; `content` / `images`
- assistant `tool_use` -> `tool_calls` (arguments as JSON text) ; `tool_calls` (an object)
- assistant `thinking` -> `reasoning_content` ; `thinking`
- user `tool_result` -> a `tool` message with `tool_call_id` ; a `tool` message with
  `tool_name` and `tool_call_id`; `is_error: true` puts "Error: " before the result's text
- `max_tokens`, `stop_sequences` -> `max_tokens`, `stop` ; `options.num_predict`, `options.stop`
- `temperature`, `top_p`, `top_k` -> the same names (`top_k`: llama.cpp's and vLLM's) ; `options.*`
- `tools` (name, description, input_schema) -> function tools (`parameters`) ; the same
- `tool_choice` auto / any / tool / none -> "auto" / "required" / the named function / "none" ;
  all tools / all tools / the named tool only / no tools: Ollama cannot force a call, so
  any and tool are not enforced there (`ollama_ignored` names them)
- `disable_parallel_tool_use` -> `parallel_tool_calls: false` ; nothing (named)
- `thinking` enabled, adaptive / disabled -> `chat_template_kwargs.enable_thinking` true
  (with `reasoning_effort` from the budget, EFFORT_STEPS) / false ; `think` true / false
- `output_config.effort` -> `reasoning_effort` (xhigh, max: "high") ; nothing (named)
- `output_config.format` (a JSON schema) -> `response_format` json_schema ; `format`
- `metadata.user_id` -> `user` ; nothing (it is metadata)

`redacted_thinking` blocks are Anthropic's encrypted reasoning, meaningless to other models:
left out of the history. `cache_control` anywhere has no effect.
"""

from __future__ import annotations

import json
from typing import Any

# Thinking budget (tokens) -> the `reasoning_effort` level OpenAI-compatible servers read
# (vLLM, llama.cpp for gpt-oss): up to 4k low, up to 16k medium, above high.
EFFORT_STEPS = ((4096, "low"), (16384, "medium"))


def system_text(data: dict[str, Any]) -> str:
    """`system` as one string: the string, or the text blocks joined by a blank line; "" when absent."""
    system = data.get("system")
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n\n".join(block["text"] for block in system)
    return ""


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def result_text(block: dict[str, Any]) -> str:
    """A tool_result's content as text; "Error: " before it when `is_error` is true."""
    content = block.get("content")
    if isinstance(content, list):
        text = "\n".join(part["text"] for part in content)
    else:
        text = content or ""
    return f"Error: {text}" if block.get("is_error") else text


def _data_uri(block: dict[str, Any]) -> str:
    source = block["source"]
    return f"data:{source['media_type']};base64,{source['data']}"


def effort(data: dict[str, Any]) -> str:
    """The `reasoning_effort` of a request: `output_config.effort` (Anthropic's xhigh and max
    are "high"), else from the thinking budget (EFFORT_STEPS), else "medium"."""
    given = (data.get("output_config") or {}).get("effort")
    if given is not None:
        return given if given in ("low", "medium", "high") else "high"
    budget = (data.get("thinking") or {}).get("budget_tokens")
    if not isinstance(budget, int):
        return "medium"
    for limit, level in EFFORT_STEPS:
        if budget <= limit:
            return level
    return "high"


def thinking_switch(data: dict[str, Any]) -> bool | None:
    """True (enabled, adaptive, between_tools), False (disabled), None (not set: the model's
    default)."""
    thinking = data.get("thinking")
    if not isinstance(thinking, dict):
        return None
    return thinking.get("type") != "disabled"


def _format(data: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of `output_config.format` (structured output), or None."""
    fmt = (data.get("output_config") or {}).get("format")
    return fmt["schema"] if isinstance(fmt, dict) else None


def _system_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The first `system` message of both targets, or none when the request has no system text."""
    system = system_text(data)
    return [{"role": "system", "content": system}] if system else []


def _sampling(data: dict[str, Any], max_tokens: int | None, limit_name: str) -> dict[str, Any]:
    """The output limit (`max_tokens` over the request's, under `limit_name`), `temperature`,
    `top_p`, `top_k` and `stop` (from `stop_sequences`), each only when set: the same for both
    targets but for the limit's name (OpenAI `max_tokens`, Ollama `options.num_predict`)."""
    out: dict[str, Any] = {}
    limit = max_tokens if max_tokens is not None else data.get("max_tokens")
    if limit is not None:
        out[limit_name] = limit
    for name in ("temperature", "top_p", "top_k"):
        if data.get(name) is not None:
            out[name] = data[name]
    if data.get("stop_sequences"):
        out["stop"] = data["stop_sequences"]
    return out


def _assistant_parts(
    content: str | list[dict[str, Any]],
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """An assistant message's text pieces, thinking pieces and tool_use blocks, in order
    (redacted_thinking left out)."""
    text: list[str] = []
    thinking: list[str] = []
    uses: list[dict[str, Any]] = []
    for block in _blocks(content):
        kind = block["type"]
        if kind == "text":
            text.append(block["text"])
        elif kind == "thinking":
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            uses.append(block)
    return text, thinking, uses


# --------------------------------------------------------------------------- OpenAI


def _openai_user(content: str | list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
    parts: list[dict[str, Any]] = []

    def flush() -> None:
        if not parts:
            return
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": list(parts)})
        parts.clear()

    for block in _blocks(content):
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _data_uri(block)}})
        elif kind == "tool_result":
            flush()
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result_text(block)})
    flush()


def _openai_assistant(content: str | list[dict[str, Any]]) -> dict[str, Any]:
    text, thinking, uses = _assistant_parts(content)
    calls = [
        {
            "id": block["id"],
            "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"])},
        }
        for block in uses
    ]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def openai_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat-completions `messages` of a request: the system message first, then each
    message as the module docstring maps it (a user message with tool results may become
    several: the `tool` messages, then the rest of its text and images)."""
    out = _system_messages(data)
    for message in data["messages"]:
        if message["role"] == "user":
            _openai_user(message["content"], out)
        else:
            out.append(_openai_assistant(message["content"]))
    return out


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def openai_request(
    data: dict[str, Any], model: str, *, stream: bool, max_tokens: int | None
) -> dict[str, Any]:
    """The chat-completions body for `model` (the server's name). `max_tokens` overrides the
    request's (count_tokens asks for 1)."""
    body: dict[str, Any] = {"model": model, "messages": openai_messages(data), "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(_sampling(data, max_tokens, "max_tokens"))
    tools = data.get("tools")
    choice = data.get("tool_choice") or {}
    if tools:
        body["tools"] = [_function(tool) for tool in tools]
        kind = choice.get("type")
        if kind == "any":
            body["tool_choice"] = "required"
        elif kind == "tool":
            body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "none"):
            body["tool_choice"] = kind
        if choice.get("disable_parallel_tool_use") is True:
            body["parallel_tool_calls"] = False
    switch = thinking_switch(data)
    if switch is not None:
        body["chat_template_kwargs"] = {"enable_thinking": switch}
    if switch or (switch is None and (data.get("output_config") or {}).get("effort")):
        body["reasoning_effort"] = effort(data)
    schema = _format(data)
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": schema},
        }
    user = (data.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user:
        body["user"] = user
    return body


# --------------------------------------------------------------------------- Ollama


def _tool_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """tool_use id -> tool name, over the conversation (Ollama pairs results by name)."""
    names: dict[str, str] = {}
    for message in messages:
        content = message.get("content")
        if message["role"] == "assistant" and isinstance(content, list):
            for block in content:
                if block["type"] == "tool_use":
                    names[block["id"]] = block["name"]
    return names


def _ollama_user(
    content: str | list[dict[str, Any]], names: dict[str, str], out: list[dict[str, Any]]
) -> None:
    text: list[str] = []
    images: list[str] = []

    def flush() -> None:
        if not text and not images:
            return
        item: dict[str, Any] = {"role": "user", "content": "".join(text)}
        if images:
            item["images"] = list(images)
        out.append(item)
        text.clear()
        images.clear()

    for block in _blocks(content):
        kind = block["type"]
        if kind == "text":
            text.append(block["text"])
        elif kind == "image":
            images.append(block["source"]["data"])
        elif kind == "tool_result":
            flush()
            item = {"role": "tool", "content": result_text(block), "tool_call_id": block["tool_use_id"]}
            name = names.get(block["tool_use_id"])
            if name:
                item["tool_name"] = name
            out.append(item)
    flush()


def _ollama_assistant(content: str | list[dict[str, Any]]) -> dict[str, Any]:
    text, thinking, uses = _assistant_parts(content)
    calls = [
        {"id": block["id"], "function": {"name": block["name"], "arguments": block["input"]}}
        for block in uses
    ]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if thinking:
        message["thinking"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def ollama_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The /api/chat `messages` of a request, as openai_messages (tool results name their
    tool, found by the tool_use id they answer)."""
    out = _system_messages(data)
    names = _tool_names(data["messages"])
    for message in data["messages"]:
        if message["role"] == "user":
            _ollama_user(message["content"], names, out)
        else:
            out.append(_ollama_assistant(message["content"]))
    return out


def ollama_request(
    data: dict[str, Any], model: str, *, stream: bool, max_tokens: int | None
) -> dict[str, Any]:
    """The /api/chat body for `model` (the server's name); `max_tokens` as in openai_request."""
    body: dict[str, Any] = {"model": model, "messages": ollama_messages(data), "stream": stream}
    options = _sampling(data, max_tokens, "num_predict")
    if options:
        body["options"] = options
    tools = data.get("tools")
    choice = data.get("tool_choice") or {}
    if tools and choice.get("type") != "none":
        if choice.get("type") == "tool":
            tools = [tool for tool in tools if tool["name"] == choice["name"]]
        body["tools"] = [_function(tool) for tool in tools]
    switch = thinking_switch(data)
    if switch is not None:
        body["think"] = switch
    schema = _format(data)
    if schema is not None:
        body["format"] = schema
    return body


def ollama_ignored(data: dict[str, Any]) -> list[str]:
    """What an Ollama server cannot honour of this request: a forced tool choice, parallel tool
    calls switched off, an effort level (Ollama has none of these switches); named in
    `X-Router-Ignored`."""
    choice = data.get("tool_choice") or {}
    ignored = []
    if data.get("tools") and choice.get("type") in ("any", "tool"):
        ignored.append("tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        ignored.append("tool_choice.disable_parallel_tool_use")
    if (data.get("output_config") or {}).get("effort") is not None:
        ignored.append("output_config.effort")
    return ignored
