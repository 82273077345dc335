"""The shape of an Anthropic Messages request, checked whole before any slot is taken.

Source: Anthropic's API reference (Messages, Count tokens). `check_messages` and
`check_count` raise a 400 ApiError naming the first wrong field by its path
("messages[1].content[0].source.type must be ..."); the translation (convert.py) only runs on
bodies they accepted and never raises.

What is refused here, before any server is asked (the router cannot honour it on an
OpenAI-compatible or Ollama server, and says so rather than dropping it): content blocks
other than text, image, tool_use, tool_result, thinking and redacted_thinking; a tool_result
whose `tool_use_id` names no tool_use block of the message just before (Anthropic refuses it
too; a server's chat template may fail on a result without its call); an image
whose source is not base64 (a `url` source would be fetched by some servers and not by
others); an image inside a tool_result; tools other than client tools (`type` absent or
"custom": Anthropic's server tools such as web_search run on Anthropic's side).
Top-level fields the router does not know (Anthropic adds them often: `container`,
`inference_geo`, `context_management`...) are not refused: they are left out of the
upstream request and named in the reply's `X-Router-Ignored` header (`ignored_fields`).
`cache_control` on any block is accepted and has no effect (a caching hint).
"""

from __future__ import annotations

import re
from typing import Any

from routing.core.errors import ApiError
from routing.protocols.common import schema
from routing.protocols.common.schema import BOOL, NUM, OBJ, STR, AnyOf, Int, ListOf, Obj, Str

MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
THINKING_TYPES = frozenset({"enabled", "disabled", "adaptive", "between_tools"})
EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})

_TEXT_BLOCK = Obj({"type": STR, "text": STR}, required=frozenset({"text"}), what="a text block")
_SYSTEM = AnyOf(
    (STR, ListOf(_TEXT_BLOCK, what="a list of text blocks")), what="a string or a list of text blocks"
)
_MESSAGE = Obj(
    {
        "role": Str(what="'user' or 'assistant'", choices=frozenset({"user", "assistant"})),
        "content": AnyOf(
            (STR, ListOf(Obj(what="a content block object"), what="a list of content blocks")),
            what="a string or a list of content blocks",
        ),
    },
    required=frozenset({"role"}),
    what="a message object",
)
_TOOL = Obj(
    {
        "type": STR,
        "name": Str(what="a non-empty string", nonblank=True),
        "description": STR,
        "input_schema": OBJ,
    },
    required=frozenset({"name"}),
    what="a tool object",
)
_TOOL_CHOICE = Obj(
    {
        "type": Str(what="one of 'auto', 'any', 'tool', 'none'", choices=TOOL_CHOICES),
        "name": STR,
        "disable_parallel_tool_use": BOOL,
    },
    required=frozenset({"type"}),
)
_THINKING = Obj(
    {
        "type": Str(
            what="one of " + ", ".join(f"'{t}'" for t in sorted(THINKING_TYPES)), choices=THINKING_TYPES
        ),
        "budget_tokens": Int(what="a positive integer", minimum=1),
        "display": Str(what="'summarized' or 'omitted'", choices=frozenset({"summarized", "omitted"})),
    },
    required=frozenset({"type"}),
)
_OUTPUT_CONFIG = Obj(
    {
        "effort": Str(what="one of " + ", ".join(f"'{e}'" for e in sorted(EFFORTS)), choices=EFFORTS),
        "format": Obj(
            {"type": Str(what="'json_schema'", choices=frozenset({"json_schema"})), "schema": OBJ},
            required=frozenset({"schema"}),
        ),
    }
)
_COMMON: dict[str, schema.Spec] = {
    "model": STR,
    "messages": ListOf(_MESSAGE, what="a list of message objects"),
    "system": _SYSTEM,
    "tools": ListOf(_TOOL, what="a list of tool objects"),
    "tool_choice": _TOOL_CHOICE,
    "thinking": _THINKING,
    "output_config": _OUTPUT_CONFIG,
}
MESSAGES = Obj(
    {
        **_COMMON,
        "max_tokens": Int(what="a positive integer", minimum=1),
        "stop_sequences": ListOf(STR, what="a list of strings"),
        "temperature": NUM,
        "top_p": NUM,
        "top_k": Int(what="a non-negative integer", minimum=0),
        "stream": BOOL,
        "metadata": Obj({"user_id": STR}),
        "service_tier": STR,
    }
)
COUNT = Obj(_COMMON)

# Top-level fields read or translated, or accepted without effect and not named: Anthropic's
# capacity tier and serving speed, a prompt-caching hint. Any other field is ignored and named
# (ignored_fields).
KNOWN = frozenset(MESSAGES.fields) | {"cache_control", "speed"}


def _bad(path: str, why: str) -> ApiError:
    return ApiError(400, f"'{path}' {why}")


def _check_image(block: dict[str, Any], path: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{path}.source", "is required (an object)")
    kind = source.get("type")
    if kind != "base64":
        raise _bad(
            f"{path}.source.type",
            f"must be 'base64' (got {kind!r}): the router sends images inline to every server kind",
        )
    if source.get("media_type") not in MEDIA_TYPES:
        raise _bad(f"{path}.source.media_type", f"must be one of {', '.join(sorted(MEDIA_TYPES))}")
    if not isinstance(source.get("data"), str) or not source["data"]:
        raise _bad(f"{path}.source.data", "must be a non-empty base64 string")


def _check_tool_result(block: dict[str, Any], path: str) -> None:
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        raise _bad(f"{path}.tool_use_id", "must be a non-empty string")
    if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
        raise _bad(f"{path}.is_error", "must be a boolean")
    content = block.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(f"{path}.content", "must be a string or a list of text blocks")
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _bad(
                f"{path}.content[{i}]",
                "must be a text block (images in tool results have no equivalent on the router's servers)",
            )


# The block types only one role may send: type -> (that role, the error when another sends it).
_ONE_ROLE: dict[str, tuple[str, str]] = {
    "image": ("user", "an image block is only valid in a user message"),
    "tool_use": ("assistant", "a tool_use block is only valid in an assistant message"),
    "tool_result": ("user", "a tool_result block is only valid in a user message"),
    "thinking": ("assistant", "a thinking block is only valid in an assistant message"),
    "redacted_thinking": ("assistant", "a redacted_thinking block is only valid in an assistant message"),
}


def _check_block(block: dict[str, Any], role: str, path: str) -> None:
    kind = block.get("type")
    if isinstance(kind, str) and kind in _ONE_ROLE and role != _ONE_ROLE[kind][0]:
        raise _bad(path, _ONE_ROLE[kind][1])
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise _bad(f"{path}.text", "must be a string")
    elif kind == "image":
        _check_image(block, path)
    elif kind == "tool_use":
        for name in ("id", "name"):
            if not isinstance(block.get(name), str) or not block[name]:
                raise _bad(f"{path}.{name}", "must be a non-empty string")
        if not isinstance(block.get("input"), dict):
            raise _bad(f"{path}.input", "must be an object")
    elif kind == "tool_result":
        _check_tool_result(block, path)
    elif kind == "thinking":
        if not isinstance(block.get("thinking"), str):
            raise _bad(f"{path}.thinking", "must be a string")
    elif kind == "redacted_thinking":
        pass  # opaque; left out of the history (convert.py)
    elif isinstance(kind, str):
        raise _bad(f"{path}.type", f"'{kind}' is not supported by this router")
    else:
        raise _bad(f"{path}.type", "is required (a string)")


def _check_semantics(data: dict[str, Any]) -> None:
    messages = data.get("messages")
    if not messages:
        raise _bad("messages", "is required (a non-empty list)")
    calls: set[str] = set()  # the tool_use ids of the message before, which results answer
    for m, message in enumerate(messages):
        content = message.get("content")
        if content is None:
            raise _bad(f"messages[{m}].content", "is required")
        asked: set[str] = set()
        if isinstance(content, list):
            for b, block in enumerate(content):
                path = f"messages[{m}].content[{b}]"
                _check_block(block, message["role"], path)
                if block["type"] == "tool_use":
                    asked.add(block["id"])
                elif block["type"] == "tool_result" and block["tool_use_id"] not in calls:
                    raise _bad(
                        f"{path}.tool_use_id",
                        f"{block['tool_use_id'][:64]!r} answers no tool_use block of the message before",
                    )
        calls = asked
    for t, tool in enumerate(data.get("tools") or ()):
        if tool.get("type") not in (None, "custom"):
            raise _bad(
                f"tools[{t}].type",
                f"'{tool['type']}' is a server tool Anthropic runs itself; only client tools are supported",
            )
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        names = {tool.get("name") for tool in data.get("tools") or ()}
        if choice.get("name") not in names:
            raise _bad("tool_choice.name", "must name one of the request's tools")
    thinking = data.get("thinking")
    if (
        isinstance(thinking, dict)
        and thinking.get("type") == "enabled"
        and thinking.get("budget_tokens") is None
    ):
        raise _bad("thinking.budget_tokens", "is required when thinking is enabled")


def check_messages(data: dict[str, Any]) -> None:
    """Raise the 400 of the first thing wrong with a /v1/messages body (see the module docstring)."""
    schema.check(MESSAGES, data)
    if data.get("max_tokens") is None:
        raise _bad("max_tokens", "is required")
    _check_semantics(data)


def check_count(data: dict[str, Any]) -> None:
    """Raise the 400 of the first thing wrong with a /v1/messages/count_tokens body."""
    schema.check(COUNT, data)
    _check_semantics(data)


# A header value is ASCII without control characters (Django refuses CR and LF, a 500): a
# field name that is not a plain token is named "?" and the value is cut at IGNORED_MAX bytes.
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
IGNORED_MAX = 512


def ignored_fields(data: dict[str, Any]) -> str:
    """The set top-level fields the router does not translate ("context_management,container"),
    as the value of the reply's `X-Router-Ignored` header; "" when none. A name that is not a
    token of at most 64 letters, digits, `_`, `.`, `-` is shown as "?"; the value is at most
    IGNORED_MAX characters, ending in ",..." when cut."""
    names = [
        name if _TOKEN.fullmatch(name) else "?"
        for name, value in data.items()
        if name not in KNOWN and value is not None
    ]
    value = ",".join(names)
    if len(value) > IGNORED_MAX:
        value = value[: IGNORED_MAX - 4].rsplit(",", 1)[0] + ",..."
    return value
