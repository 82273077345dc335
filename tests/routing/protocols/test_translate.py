# ruff: noqa: E501  (tables of cases, one per line)
"""Unit and property tests of the Ollama -> OpenAI-compatible translation (routing/protocols/translate.py)
and of the request shapes checked before routing (routing/protocols/common/schema.py, routing/protocols/common/parsing.py).

- tool-call ids: every tool result gets the id of a call it can answer, each call answered
  at most once, ids unique, the same conversation always translated the same;
- streamed tool-call deltas: however the server splits the arguments, interleaves the
  calls, repeats or leaves out ids and indexes, and however the bytes are cut, the
  assembled calls are the ones it meant;
- thinking, options, refusals, raw completions;
- the shapes: a wrong value anywhere is a 400 naming its path, never another exception.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.core.errors import ApiError
from routing.protocols import translate
from routing.protocols.common import schema
from routing.protocols.common.parsing import parse_object
from routing.protocols.ollama import loading

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.sampled_from(["get_weather", "get_time", "search", "f"])
arguments = st.dictionaries(
    st.sampled_from(["city", "q", "n"]), st.text(max_size=6) | st.integers(), max_size=3
)


# --------------------------------------------------------------------------- tool-call ids


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rounds of: assistant calls, then results for some of them, by name, by order or by id."""
    out: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for _ in range(draw(st.integers(1, 3))):
        calls = [
            {"function": {"name": draw(names), "arguments": draw(arguments)}}
            for _ in range(draw(st.integers(1, 3)))
        ]
        out.append({"role": "assistant", "content": "", "tool_calls": calls})
        answered = draw(st.permutations(range(len(calls))))
        for i in answered[: draw(st.integers(0, len(calls)))]:
            how = draw(st.sampled_from(["name", "order"]))
            result: dict[str, Any] = {"role": "tool", "content": "r"}
            if how == "name":
                result["tool_name"] = calls[i]["function"]["name"]
            out.append(result)
    return out


@PROPERTY
@given(conversations())
def test_every_tool_result_answers_an_open_call_of_its_round(conversation: list[dict[str, Any]]):
    schema.check(schema.OLLAMA_CHAT, {"messages": conversation})
    sent = translate.messages(conversation)
    assert translate.messages(conversation) == sent  # deterministic
    open_calls: dict[str, str] = {}
    seen_ids: set[str] = set()
    for original, msg in zip(conversation, sent, strict=True):
        if msg["role"] == "assistant" and "tool_calls" in msg:
            open_calls = {c["id"]: c["function"]["name"] for c in msg["tool_calls"]}
            assert not seen_ids & open_calls.keys() and len(open_calls) == len(msg["tool_calls"])
            seen_ids |= open_calls.keys()
            for call, given_call in zip(msg["tool_calls"], original["tool_calls"], strict=True):
                assert json.loads(call["function"]["arguments"]) == given_call["function"]["arguments"]
        if msg["role"] == "tool":
            cid = msg["tool_call_id"]
            assert cid in open_calls
            if original.get("tool_name"):
                assert open_calls[cid] == original["tool_name"]
            del open_calls[cid]


def test_given_ids_are_kept_and_a_tool_call_id_wins_over_the_name():
    conversation: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "x1", "function": {"name": "f", "arguments": "{}"}},
                {"function": {"name": "f", "arguments": {}}},
            ],
        },
        {"role": "tool", "tool_name": "f", "tool_call_id": "call_0_1", "content": "second"},
        {"role": "tool", "tool_name": "f", "content": "first"},
    ]
    sent = translate.messages(conversation)
    assert [c["id"] for c in sent[0]["tool_calls"]] == ["x1", "call_0_1"]
    assert sent[0]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert [m["tool_call_id"] for m in sent[1:]] == ["call_0_1", "x1"]


def test_a_tool_result_with_no_open_call_goes_without_an_id():
    sent = translate.messages([{"role": "tool", "tool_name": "f", "content": "x"}])
    assert "tool_call_id" not in sent[0] and sent[0]["name"] == "f"


# --------------------------------------------------------------------------- streamed deltas


def sse(events: list[Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in [*events, "[DONE]"]).replace(
        b'data: "[DONE]"', b"data: [DONE]"
    )


@st.composite
def tool_streams(draw: st.DrawFn) -> tuple[list[tuple[str, str, dict[str, Any]]], list[dict[str, Any]], str]:
    """Calls, and the deltas a server might stream them as."""
    calls = [(f"id{i}", draw(names), draw(arguments)) for i in range(draw(st.integers(1, 4)))]
    with_index = draw(st.booleans())
    pieces: list[list[dict[str, Any]]] = []
    for i, (cid, name, args) in enumerate(calls):
        text = json.dumps(args)
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=4)))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        deltas: list[dict[str, Any]] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": parts[0]}}
        ]
        deltas += [{"function": {"arguments": p}} for p in parts[1:]]
        if draw(st.booleans()):
            for d in deltas[1:]:
                d["id"] = cid  # some servers repeat the id on every delta
        for d in deltas:
            if with_index:
                d["index"] = i
        pieces.append(deltas)
    events: list[dict[str, Any]] = []
    if with_index:  # indexed calls may interleave
        queues = [list(p) for p in pieces]
        while any(queues):
            live = [q for q in queues if q]
            events.append(
                {"choices": [{"index": 0, "delta": {"tool_calls": [draw(st.sampled_from(live)).pop(0)]}}]}
            )
    else:  # without an index, each call's deltas come together, the id on its first
        for deltas in pieces:
            for d in deltas[1:]:
                d.pop("id", None)
            events += [{"choices": [{"index": 0, "delta": {"tool_calls": [d]}}]} for d in deltas]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    return calls, events, draw(st.sampled_from(["\n", "\r\n"]))


@PROPERTY
@given(tool_streams(), st.data())
def test_streamed_tool_calls_are_assembled_however_they_arrive(stream: Any, data: st.DataObject):
    calls, events, newline = stream
    raw = sse(events).replace(b"\n", newline.encode())
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    relay = translate.ChatFromSse("gpt-x", "message")
    out = b"".join(relay.feed(raw[a:b]) for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True))
    out += relay.finish()
    lines = [json.loads(line) for line in out.splitlines()]
    with_calls = [
        line["message"]["tool_calls"] for line in lines if line.get("message", {}).get("tool_calls")
    ]
    assert len(with_calls) == 1
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in with_calls[0]] == calls
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    counts = relay.counts()
    assert counts is not None and counts.completion == 4


# --------------------------------------------------------------------------- thinking, options


@pytest.mark.parametrize(
    ("think", "expected"),
    [
        (True, {"chat_template_kwargs": {"enable_thinking": True}}),
        (False, {"chat_template_kwargs": {"enable_thinking": False}}),
        ("low", {"reasoning_effort": "low", "chat_template_kwargs": {"enable_thinking": True}}),
        (None, {}),
    ],
)
def test_think_is_forwarded_in_the_forms_servers_read(think: Any, expected: dict[str, Any]):
    body = translate.chat_request({"messages": [], "think": think}, "m", False)
    assert {k: body[k] for k in ("chat_template_kwargs", "reasoning_effort") if k in body} == expected


def test_options_map_to_each_servers_names():
    options = {
        "num_predict": 5,
        "top_k": 3,
        "min_p": 0.1,
        "repeat_penalty": 1.1,
        "stop": ["x"],
        "num_keep": 4,
    }
    body = translate.chat_request({"messages": [], "options": options}, "m", True)
    assert body["max_tokens"] == 5 and body["top_k"] == 3 and body["min_p"] == 0.1 and body["stop"] == ["x"]
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.1 and body["n_keep"] == 4
    assert body["stream_options"] == {"include_usage": True}
    assert "max_tokens" not in translate.chat_request({"options": {"num_predict": -1}}, "m", False)
    schema.check(schema.OLLAMA_CHAT, {"options": {"num_predict": 100.0}})
    assert translate.chat_request({"options": {"num_predict": 100.0}}, "m", False)["max_tokens"] == 100
    assert set(translate.OPTIONS) | translate.SERVER_OPTIONS <= set(schema.OPTIONS.fields) | {"tfs_z"}


def test_the_whole_reply_keeps_reasoning_and_drops_it_when_think_is_false():
    reply = {
        "choices": [{"message": {"content": "a", "reasoning": "r"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }
    body = json.dumps(reply).encode()
    chat, counts = translate.whole_reply("m", "message")(body)
    assert json.loads(chat)["message"]["thinking"] == "r" and counts is not None and counts.total == 3
    generate, _ = translate.whole_reply("m", "response")(body)
    assert json.loads(generate)["thinking"] == "r"
    hidden, _ = translate.whole_reply("m", "response", think=False)(body)
    assert "thinking" not in json.loads(hidden)


def test_a_raw_generate_becomes_a_plain_completion():
    data = {"prompt": "<s>hi", "raw": True, "options": {"seed": 2}}
    body = translate.generate_request(data, "m", False)
    assert body == {"model": "m", "stream": False, "prompt": "<s>hi", "seed": 2}
    suffix = translate.generate_request({"prompt": "def f(", "suffix": "return x"}, "m", False)
    assert suffix["suffix"] == "return x" and "messages" not in suffix


@pytest.mark.parametrize(
    ("path", "data", "named"),
    [
        ("/api/chat", {"options": {"num_ctx": 4096, "tfs_z": 1.0}}, "options.tfs_z"),
        ("/api/chat", {"options": {"tfs_z": 1.0}}, "options.tfs_z"),
        ("/api/chat", {"messages": [{"role": "developer", "content": "x"}]}, "messages[0].role"),
        ("/api/chat", {"format": "xml"}, "format"),
        ("/api/generate", {"template": "x"}, "template"),
        ("/api/generate", {"context": [1]}, "context"),
        ("/api/generate", {"raw": True, "images": ["aGk="]}, "images"),
        ("/api/generate", {"suffix": "x", "system": "s"}, "system"),
        ("/api/generate", {"raw": True, "think": True}, "think"),
        ("/api/embed", {"truncate": True}, "truncate"),
        ("/api/embed", {"options": {"temperature": 1}}, "options.temperature"),
        ("/api/chat", {"logprobs": True}, "logprobs"),
        ("/api/generate", {"shift": False}, "shift"),
        ("/api/chat", {"messages": [{"role": "user", "name": "bob"}]}, "messages[0].name"),
    ],
)
def test_untranslatable_fields_are_refused_by_name(path: str, data: dict[str, Any], named: str):
    err = translate.refusal(path, data)
    assert err is not None and err.status == 400 and f"'{named}'" in err.message


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings"])
def test_load_time_options_are_accepted_not_forwarded_and_named(path: str):
    options = {name: 1 for name in sorted(translate.SERVER_OPTIONS)}
    assert translate.refusal(path, {"options": options}) is None
    assert translate.ignored_options({"options": {"num_gpu": 1, "seed": 2, "num_ctx": 8, "numa": None}}) == (
        "num_gpu,num_ctx"  # in the request's order; null is not set
    )
    assert translate.ignored_options({"options": {"seed": 1}}) == ""
    assert translate.ignored_options({}) == ""
    if path == "/api/chat":
        body = translate.chat_request({"messages": [], "options": {**options, "seed": 3}}, "m", False)
        assert not translate.SERVER_OPTIONS & set(body) and body["seed"] == 3


def test_translatable_requests_are_not_refused():
    assert translate.refusal("/api/chat", {"messages": [{"role": "user"}], "options": {"seed": 1}}) is None
    assert translate.refusal("/api/generate", {"raw": True, "think": False, "context": []}) is None
    assert translate.refusal("/api/embed", {"truncate": False, "options": {}}) is None
    assert (
        translate.refusal("/api/chat", {"logprobs": None, "messages": [{"role": "user", "name": None}]})
        is None
    )


# --------------------------------------------------------------------------- load / unload


@pytest.mark.parametrize(
    ("keep_alive", "unload"),
    [
        (0, True),
        (0.0, True),
        ("0", True),
        ("0s", True),
        ("0.0m", True),
        ("5m", False),
        (-1, False),
        (None, False),
        (False, False),
    ],
)
def test_keep_alive_zero_means_unload(keep_alive: Any, unload: bool):
    assert loading.is_unload({"keep_alive": keep_alive}) is unload


def test_a_request_with_nothing_to_generate_is_a_load():
    assert loading.is_load_request("/api/chat", {"messages": []})
    assert loading.is_load_request("/api/generate", {"prompt": ""})
    assert not loading.is_load_request("/api/chat", {"messages": [{"role": "user"}]})


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("spec", "body", "message"),
    [
        (schema.OLLAMA_CHAT, {"messages": [{"role": "user", "images": [5]}]}, "'messages[0].images[0]' must be a base64 string"),
        (schema.OLLAMA_CHAT, {"messages": [{"role": "user", "images": 5}]}, "'messages[0].images' must be a list"),
        (schema.OLLAMA_CHAT, {"messages": [{"role": "assistant", "tool_calls": 5}]}, "'messages[0].tool_calls' must be a list"),
        (schema.OLLAMA_CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"function": "f"}]}]}, "'messages[0].tool_calls[0].function' must be an object"),
        (schema.OLLAMA_CHAT, {"messages": [{"content": "x"}]}, "'messages[0].role' is required"),
        (schema.OLLAMA_CHAT, {"options": {"temperature": "hot"}}, "'options.temperature' must be a number"),
        (schema.OLLAMA_CHAT, {"think": "max"}, "'think' must be a boolean or one of"),
        (schema.OLLAMA_GENERATE, {"images": [1]}, "'images[0]' must be a base64 string"),
        (schema.OLLAMA_GENERATE, {"options": {"num_predict": 1.5}}, "'options.num_predict' must be an integer"),
        (schema.OLLAMA_GENERATE, {"options": {"top_p": 1e999}}, "'options.top_p' must be a number"),
        (schema.OLLAMA_EMBED, {"input": ["a", 1]}, "'input[1]' must be a string"),
        (schema.OPENAI_CHAT, {"messages": [{"role": "user", "content": 5}]}, "'messages[0].content' must be a string or a list of parts"),
        (schema.OPENAI_CHAT, {"stream_options": {"include_usage": "yes"}}, "'stream_options.include_usage' must be a boolean"),
        (schema.OPENAI_EMBEDDINGS, {"input": [[1, "x"]]}, "'input[0][1]' must be an integer"),
    ],
)  # fmt: skip
def test_a_wrong_value_is_named_by_its_path(spec: schema.Obj, body: dict[str, Any], message: str):
    with pytest.raises(ApiError) as info:
        schema.check(spec, body)
    assert info.value.status == 400 and info.value.message.startswith(message), info.value.message


def test_null_is_absent_and_unknown_fields_pass():
    schema.check(schema.OLLAMA_CHAT, {"format": None, "tools": None, "images": None, "x": {"y": [1]}})
    schema.check(schema.OPENAI_CHAT, {"messages": [{"role": "assistant", "content": None}], "logit_bias": {}})


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": ' + b"1" * 5000 + b"}",
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    ],
    ids=["5000-digit integer", "NaN", "-Infinity", "deep nesting"],
)
def test_bodies_python_would_choke_on_are_a_400(body: bytes):
    with pytest.raises(ApiError) as info:
        parse_object(body)
    assert info.value.status == 400 and info.value.message.startswith("invalid JSON")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
SPECS = [v for v in vars(schema).values() if isinstance(v, schema.Obj)]


@PROPERTY
@given(
    st.sampled_from(SPECS),
    st.dictionaries(
        st.sampled_from(
            [
                "messages",
                "options",
                "input",
                "prompt",
                "tools",
                "think",
                "format",
                "images",
                "stream_options",
                "keep_alive",
            ]
        ),
        json_values,
    ),
)
def test_any_value_checks_or_is_a_400(spec: schema.Obj, body: dict[str, Any]):
    try:
        schema.check(spec, body)
    except ApiError as err:
        assert err.status == 400 and err.message.startswith("'")


def at_depth(frames: int, call: Any) -> Any:
    return at_depth(frames - 1, call) if frames else call()


def test_whatever_parses_also_encodes_a_few_frames_deeper():
    """The kind: a body nested just within what the decoder reaches, re-encoded for an
    upstream server further down the stack (issue 11: any nesting is a 400, never a 500)."""
    parsed = 0
    for depth in range(700, 1000, 7):
        body = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
        try:
            data = parse_object(body)
        except ApiError as err:
            assert err.status == 400 and "nested" in err.message
            continue
        parsed += 1
        assert at_depth(24, lambda data=data: json.dumps(data))  # type: ignore[misc]
    assert parsed  # the deepest bodies that parse were tried
    wide = json.dumps({"input": [[1, 2]] * 5000}).encode()
    assert len(parse_object(wide)["input"]) == 5000
