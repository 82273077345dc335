"""Ollama chat and generate requests of any shape, translated for an OpenAI-compatible server
(routing/protocols/translate.py): each one either is refused with a 400 that names a field (by
the schema or by `refusal`) or becomes a JSON-ready OpenAI body; nothing else happens."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from routing.core.errors import ApiError
from routing.protocols import translate
from routing.protocols.common import schema

SCALAR = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.text(max_size=8)
ANY = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "developer", ""]) | st.text(max_size=5)
ARGS = st.dictionaries(st.text(max_size=5), SCALAR, max_size=3) | st.text(max_size=10)
TOOL_CALL = st.fixed_dictionaries(
    {"function": st.fixed_dictionaries({"name": st.text(max_size=6), "arguments": ARGS})},
    optional={"id": st.text(max_size=6)},
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE},
    optional={
        "content": st.text(max_size=20),
        "thinking": st.text(max_size=10),
        "images": st.lists(st.text("abcd=", max_size=8), max_size=2),
        "tool_calls": st.lists(TOOL_CALL, max_size=2),
        "tool_name": st.text(max_size=6),
        "tool_call_id": st.text(max_size=6),
        "extra": ANY,
    },
)
OPTIONS = st.dictionaries(
    st.sampled_from(["temperature", "top_p", "num_predict", "seed", "stop", "num_ctx", "mirostat", "top_k"]),
    SCALAR | st.lists(st.text(max_size=4), max_size=2),
    max_size=4,
)
COMMON = {
    "stream": st.booleans(),
    "options": OPTIONS,
    "format": st.sampled_from(["json", "", "yaml"]) | st.dictionaries(st.text(max_size=5), ANY, max_size=2),
    "keep_alive": st.sampled_from(["5m", 0, -1, "0"]),
    "think": st.sampled_from([True, False, "low", "high", None]),
}
CHAT = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        **COMMON,
        "messages": st.lists(MESSAGE, max_size=4),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": ANY}), max_size=2),
        "unknown": ANY,
    },
)
GENERATE = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        **COMMON,
        "prompt": st.text(max_size=20),
        "suffix": st.text(max_size=5),
        "system": st.text(max_size=10),
        "template": st.text(max_size=5),
        "images": st.lists(st.text("abcd=", max_size=8), max_size=2),
        "context": st.lists(st.integers(0, 9), max_size=2),
        "raw": st.booleans(),
    },
)


def translated(path: str, spec: schema.Obj, data: dict[str, Any]) -> dict[str, Any] | None:
    """The OpenAI body, or None when refused with a 400 naming a field."""
    try:
        schema.check(spec, data)
    except ApiError as err:
        assert err.status == 400 and err.message.startswith("'"), err.message
        return None
    refused = translate.refusal(path, data)
    if refused is not None:
        assert refused.status == 400 and "'" in refused.message, refused.message
        return None
    stream = bool(data.get("stream", True))
    build = translate.chat_request if path == "/api/chat" else translate.generate_request
    body = build(data, "backend-model", stream)
    json.dumps(body)  # JSON-ready: nothing the encoder would refuse
    assert body["model"] == "backend-model" and body["stream"] is stream
    assert ("stream_options" in body) is stream
    return body


@settings(max_examples=300, deadline=None)
@given(CHAT)
def test_any_chat_request_is_refused_by_name_or_translated(data: dict[str, Any]) -> None:
    body = translated("/api/chat", schema.OLLAMA_CHAT, data)
    if body is None:
        return
    assert isinstance(body["messages"], list)
    for msg in body["messages"]:
        assert msg["role"] in ("system", "user", "assistant", "tool")
    if data.get("tools"):
        assert body["tools"] == data["tools"]


@settings(max_examples=300, deadline=None)
@given(GENERATE)
def test_any_generate_request_is_refused_by_name_or_translated(data: dict[str, Any]) -> None:
    body = translated("/api/generate", schema.OLLAMA_GENERATE, data)
    if body is None:
        return
    if translate.is_plain_completion(data):
        assert body["prompt"] == (data.get("prompt") or "") and "messages" not in body
    else:
        roles = [m["role"] for m in body["messages"]]
        assert roles == (["system", "user"] if data.get("system") else ["user"])
