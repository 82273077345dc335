"""Server replies as Anthropic messages and event streams (replies.py, events.py)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from routing.engine.accounting import Counts
from routing.protocols.anthropic import replies
from routing.protocols.anthropic.events import FromOllama, FromOpenAI


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


def finish(reason: str, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason, **extra}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        out.append((name_line[7:], data))
    return out


def relay_openai(
    raw: bytes, *, sizes: int = 0, **kwargs: Any
) -> tuple[list[tuple[str, dict[str, Any]]], FromOpenAI]:
    relay = FromOpenAI(
        "client-model", kwargs.pop("stops", []), keep_thinking=kwargs.pop("keep_thinking", True)
    )
    step = sizes or len(raw) or 1
    out = b"".join(relay.feed(raw[i : i + step]) for i in range(0, len(raw), step)) + relay.finish()
    return events(out), relay


def test_thinking_text_and_tool_calls_each_get_their_block_in_order() -> None:
    raw = sse(
        delta(role="assistant", reasoning_content="hmm "),
        delta(reasoning_content="ok"),
        delta(content="Hel"),
        delta(content="lo"),
        delta(
            tool_calls=[
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get", "arguments": ""}}
            ]
        ),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"x":'}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": " 1}"}}]),
        delta(tool_calls=[{"index": 1, "id": "call_b", "function": {"name": "put", "arguments": "{}"}}]),
        finish("tool_calls"),
        USAGE,
    )
    for sizes in (0, 1, 7):  # whole, byte by byte, odd cuts: the same events
        got, relay = relay_openai(raw, sizes=sizes)
        names = [name for name, _ in got]
        assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
        starts = [(d["index"], d["content_block"]) for n, d in got if n == "content_block_start"]
        assert starts == [
            (0, {"type": "thinking", "thinking": "", "signature": ""}),
            (1, {"type": "text", "text": ""}),
            (2, {"type": "tool_use", "id": "call_a", "name": "get", "input": {}}),
            (3, {"type": "tool_use", "id": "call_b", "name": "put", "input": {}}),
        ]
        stops = [d["index"] for n, d in got if n == "content_block_stop"]
        assert stops == [0, 1, 2, 3]
        deltas = [(d["index"], d["delta"]) for n, d in got if n == "content_block_delta"]
        assert deltas == [
            (0, {"type": "thinking_delta", "thinking": "hmm "}),
            (0, {"type": "thinking_delta", "thinking": "ok"}),
            (1, {"type": "text_delta", "text": "Hel"}),
            (1, {"type": "text_delta", "text": "lo"}),
            (2, {"type": "input_json_delta", "partial_json": '{"x":'}),
            (2, {"type": "input_json_delta", "partial_json": " 1}"}),
            (3, {"type": "input_json_delta", "partial_json": "{}"}),
        ]
        end = got[-2][1]
        assert end["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
        assert (end["usage"]["input_tokens"], end["usage"]["output_tokens"]) == (7, 3)
        assert relay.counts() == Counts(7, 3)
        assert got[0][1]["message"]["model"] == "client-model"


def test_a_tool_name_arriving_late_opens_the_block_with_everything_so_far() -> None:
    raw = sse(
        delta(tool_calls=[{"index": 0, "id": "c", "function": {"arguments": '{"a"'}}]),
        delta(tool_calls=[{"index": 0, "function": {"name": "late", "arguments": ":1}"}}]),
        finish("tool_calls"),
        USAGE,
    )
    got, _ = relay_openai(raw)
    (start,) = [d for n, d in got if n == "content_block_start"]
    assert start["content_block"]["name"] == "late" and start["content_block"]["id"] == "c"
    parts = [d["delta"]["partial_json"] for n, d in got if n == "content_block_delta"]
    assert "".join(parts) == '{"a":1}'


def test_stop_reasons() -> None:
    cases: list[tuple[str, dict[str, Any], list[str], tuple[str, str | None]]] = [
        ("stop", {}, [], ("end_turn", None)),
        ("length", {}, [], ("max_tokens", None)),
        ("content_filter", {}, [], ("refusal", None)),
        ("stop", {"stop_reason": "END"}, ["END"], ("stop_sequence", "END")),  # vLLM names the match
        ("stop", {"stop_reason": 2}, ["END"], ("end_turn", None)),  # a token id: the model's own end
    ]
    for reason, extra, stops, expected in cases:
        got, _ = relay_openai(sse(delta(content="x"), finish(reason, **extra), USAGE), stops=stops)
        assert (got[-2][1]["delta"]["stop_reason"], got[-2][1]["delta"]["stop_sequence"]) == expected


def test_a_stream_cut_before_it_finished_ends_with_an_error_event_not_an_invented_end() -> None:
    got, relay = relay_openai(sse(delta(content="partial"), done=False))
    assert [n for n, _ in got][-1] == "error"
    assert got[-1][1]["error"]["type"] == "api_error" and relay.counts() is None
    assert "message_stop" not in [n for n, _ in got]
    # a finish without [DONE] (and without usage: a server that refused stream_options) is an end
    got, relay = relay_openai(sse(delta(content="x"), finish("stop"), done=False))
    assert [n for n, _ in got][-1] == "message_stop" and relay.counts() is None


def test_an_error_object_mid_stream_and_the_engines_error_chunk_end_the_stream_once() -> None:
    relay = FromOpenAI("m", [], keep_thinking=True)
    out = relay.feed(
        sse(delta(content="a"), {"error": {"message": "out of memory"}}, delta(content="b"), done=False)
    )
    assert relay.error_chunk("cut") == b"" and relay.finish() == b""
    got = events(out)
    assert got[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "out of memory"}})
    assert ("content_block_delta", "b") not in [(n, d.get("delta", {}).get("text")) for n, d in got]


def test_thinking_is_dropped_when_the_client_switched_it_off() -> None:
    got, _ = relay_openai(
        sse(delta(reasoning_content="r"), delta(content="t"), finish("stop"), USAGE), keep_thinking=False
    )
    assert [d["content_block"]["type"] for n, d in got if n == "content_block_start"] == ["text"]


def ndjson(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_an_ollama_stream_with_thinking_text_and_tool_calls() -> None:
    relay = FromOllama("m", keep_thinking=True)
    raw = ndjson(
        {"message": {"role": "assistant", "content": "", "thinking": "hm"}, "done": False},
        {"message": {"role": "assistant", "content": "Hi"}, "done": False},
        {
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "a", "arguments": {"x": 1}}},
                    {"function": {"name": "b", "arguments": {}}},
                ],
            },
            "done": False,
        },
        {
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 4,
            "eval_count": 2,
        },
    )
    got = events(b"".join(relay.feed(raw[i : i + 5]) for i in range(0, len(raw), 5)) + relay.finish())
    kinds = [d["content_block"]["type"] for n, d in got if n == "content_block_start"]
    assert kinds == ["thinking", "text", "tool_use", "tool_use"]
    tools = [d["content_block"] for n, d in got if n == "content_block_start"][2:]
    assert [t["name"] for t in tools] == ["a", "b"] and all(t["id"].startswith("toolu_") for t in tools)
    inputs = [d["delta"]["partial_json"] for n, d in got if n == "content_block_delta" and d["index"] >= 2]
    assert inputs == ['{"x": 1}', "{}"]
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use" and relay.counts() == Counts(4, 2)


def test_an_ollama_stream_ending_early_or_with_an_error() -> None:
    relay = FromOllama("m", keep_thinking=True)
    relay.feed(ndjson({"message": {"role": "assistant", "content": "x"}, "done": False}))
    assert events(relay.finish())[-1][0] == "error" and relay.counts() is None
    relay = FromOllama("m", keep_thinking=True)
    got = events(relay.feed(ndjson({"error": "model crashed"})) + relay.finish())
    assert got[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "model crashed"}})


def test_whole_replies_from_each_server_kind() -> None:
    openai = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "hi",
                    "reasoning_content": "r",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 2}'}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 6},
    }
    body, counts = replies.from_openai("client", [], keep_thinking=True)(json.dumps(openai).encode())
    reply = json.loads(body)
    assert reply["content"] == [
        {"type": "thinking", "thinking": "r", "signature": ""},
        {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 2}},
    ]
    assert (
        reply["model"],
        reply["stop_reason"],
        reply["usage"]["input_tokens"],
        reply["usage"]["output_tokens"],
    ) == (
        "client",
        "tool_use",
        5,
        6,
    )
    assert counts == Counts(5, 6) and reply["id"].startswith("msg_")
    ollama = {
        "message": {"role": "assistant", "content": "yo"},
        "done": True,
        "done_reason": "length",
        "prompt_eval_count": 3,
        "eval_count": 4,
    }
    body, counts = replies.from_ollama("client", keep_thinking=True)(json.dumps(ollama).encode())
    reply = json.loads(body)
    assert reply["content"] == [{"type": "text", "text": "yo"}] and reply["stop_reason"] == "max_tokens"
    assert counts == Counts(3, 4)


def test_tool_arguments_that_are_not_a_json_object_are_kept() -> None:
    assert replies.arguments('{"a": 1}') == {"a": 1}
    assert replies.arguments("not json") == {"raw": "not json"}
    assert replies.arguments("[1]") == {"value": [1]}
    assert replies.arguments("") == {}


def test_count_tokens_reads_the_prompt_count() -> None:
    assert replies.count_from_openai(
        json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 1}}).encode()
    ) == (
        b'{"input_tokens": 9}',
        Counts(9, 1),
    )
    assert replies.count_from_ollama(
        json.dumps({"done": True, "prompt_eval_count": 4, "eval_count": 1}).encode()
    )[1] == Counts(4, 1)


def _without_ids(got: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    for name, data in got:
        if name == "message_start":
            data["message"]["id"] = "msg"
    return got


COUNTS = {"prompt_eval_count": 1, "eval_count": 2}
STREAMS = {
    "openai": sse(
        delta(role="assistant", reasoning_content="r\n"),
        delta(content='é \u2028 "q"'),
        delta(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a":'}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]),
        finish("tool_calls"),
        USAGE,
    ).replace(b"\n", b"\r\n"),
    "ollama": ndjson(
        {"message": {"role": "assistant", "content": "", "thinking": "r"}, "done": False},
        {"message": {"role": "assistant", "content": "é \u2028"}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, **COUNTS},
    ),
}


@given(st.sampled_from(sorted(STREAMS)), st.lists(st.integers(min_value=1, max_value=2000), max_size=12))
def test_any_split_of_an_upstream_stream_gives_the_same_events(kind: str, cuts: list[int]) -> None:
    raw = STREAMS[kind]

    def run(pieces: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
        relay: FromOpenAI | FromOllama = FromOllama("m", keep_thinking=True)
        if kind == "openai":
            relay = FromOpenAI("m", [], keep_thinking=True)
        return _without_ids(events(b"".join(relay.feed(p) for p in pieces) + relay.finish()))

    points = sorted({c % len(raw) for c in cuts} | {0, len(raw)})
    pieces = [raw[a:b] for a, b in itertools.pairwise(points)]
    assert run(pieces) == run([raw])
    assert run([raw])[-1][0] == "message_stop"


def test_tool_calls_that_are_not_a_list_are_no_tool_calls() -> None:
    # `"tool_calls": 5` raised TypeError in the relay (the client's stream never ended) and in
    # the whole reply (a 502 for a reply whose text was fine).
    relay = FromOpenAI("m", [], keep_thinking=True)
    out = relay.feed(sse(delta(content="hi", tool_calls=5), finish("stop"), USAGE)) + relay.finish()
    names = [name for name, _ in events(out)]
    assert names[-1] == "message_stop" and "error" not in names
    ollama = FromOllama("m", keep_thinking=True)
    line = {"message": {"content": "hi", "tool_calls": 5}, "done": True, "done_reason": "stop"}
    assert [n for n, _ in events(ollama.feed(json.dumps(line).encode() + b"\n"))][-1] == "message_stop"
    whole = {"choices": [{"message": {"content": "hi", "tool_calls": 5}, "finish_reason": "stop"}]}
    body, _ = replies.from_openai("m", [], keep_thinking=True)(json.dumps(whole).encode())
    assert json.loads(body)["content"] == [{"type": "text", "text": "hi"}]
    body, _ = replies.from_ollama("m", keep_thinking=True)(json.dumps(line).encode())
    assert json.loads(body)["content"] == [{"type": "text", "text": "hi"}]
