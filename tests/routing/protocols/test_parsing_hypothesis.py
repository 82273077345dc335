"""Property tests (hypothesis) of request parsing, model names and the stream scanners.

- routing/protocols/common/parsing.py: any bytes give a dict or a 400 ApiError, never another exception;
  any JSON object parses back to itself; field checks answer 400 and nothing else.
- routing/core/names.py: the model key is canonical (idempotent, `:latest` implied, blanks ignored).
- routing/protocols/common/streams.py: however a stream is cut into chunks, NdjsonScanner finds the same
  final line and counts, SseScanner gives the same bytes and usage, and stripping removes
  exactly the usage-only event.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.core.errors import ApiError
from routing.core.names import display_name, model_key
from routing.engine.accounting import Counts
from routing.protocols.common.parsing import expect_types, optional_bool, parse_object, require_model
from routing.protocols.common.streams import NdjsonScanner, SseScanner, ollama_counts

pytestmark = pytest.mark.timeout(120)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)
counts = st.integers(min_value=0, max_value=10**9)


def expect_400(call: Any, *args: Any, **kwargs: Any) -> Any:
    """The call's result, or None when it raised a 400 ApiError (anything else fails)."""
    try:
        return call(*args, **kwargs)
    except ApiError as err:
        assert err.status == 400 and err.message
        return None


# --------------------------------------------------------------------------- parsing


@PROPERTY
@given(json_objects, st.booleans())
def test_it_parses_any_json_object_back_to_itself(data: dict[str, Any], ascii_only: bool):
    body = json.dumps(data, ensure_ascii=ascii_only).encode()
    assert parse_object(body) == data
    assert parse_object(b" \n" + body + b"\r\n") == data


@PROPERTY
@given(st.binary(max_size=300))
def test_it_answers_any_bytes_with_an_object_or_a_400(body: bytes):
    result = expect_400(parse_object, body)
    assert result is None or isinstance(result, dict)


@PROPERTY
@given(st.text(max_size=200))
def test_it_answers_any_text_with_an_object_or_a_400(text: str):
    result = expect_400(parse_object, text.encode("utf-8", "surrogatepass"))
    assert result is None or isinstance(result, dict)


@PROPERTY
@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_it_rejects_every_json_value_that_is_not_an_object(value: Any):
    with pytest.raises(ApiError) as info:
        parse_object(json.dumps(value).encode())
    assert info.value.status == 400


@PROPERTY
@given(st.binary(min_size=1, max_size=50).filter(lambda b: not _utf8(b)))
def test_it_rejects_invalid_utf8_with_a_400(junk: bytes):
    with pytest.raises(ApiError) as info:
        parse_object(b'{"model": "' + junk + b'"}')
    assert info.value.status == 400


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@PROPERTY
@given(json_values | st.text())
def test_it_accepts_a_model_only_when_it_is_a_sensible_name(value: Any):
    model = expect_400(require_model, {"model": value})
    if model is not None:
        assert model == value and isinstance(model, str)
        assert model == model.strip() and 0 < len(model) <= 500
        assert all(ord(c) >= 32 and not 0xD800 <= ord(c) <= 0xDFFF for c in model)
    elif isinstance(value, str) and value and value == value.strip() and len(value) <= 500:
        # refused only for a control character or a lone surrogate (not storable as UTF-8)
        assert any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in value)


@PROPERTY
@given(
    st.text(st.characters(min_codepoint=32, exclude_categories=["Cs"]), min_size=1, max_size=40).filter(
        lambda s: s == s.strip()
    )
)
def test_it_takes_the_alternative_field_when_the_model_is_missing(name: str):
    assert require_model({"name": name}, alt="name") == name
    assert require_model({"model": name, "name": "other"}, alt="name") == name


@PROPERTY
@given(json_values)
def test_it_accepts_only_booleans_as_flags(value: Any):
    got = expect_400(optional_bool, {"stream": value}, "stream", True)
    if value is None:
        assert got is True
    elif isinstance(value, bool):
        assert got is value
    else:
        assert got is None


@PROPERTY
@given(json_objects)
def test_it_checks_field_types_with_a_400_and_nothing_else(data: dict[str, Any]):
    expect_400(expect_types, data, messages=list, options=dict, format=(str, dict), prompt=str)


# --------------------------------------------------------------------------- names


names = st.text(max_size=40)


@PROPERTY
@given(names)
def test_it_makes_the_model_key_canonical(name: str):
    key = model_key(name)
    assert model_key(key) == key
    assert ":" in key.rsplit("/", 1)[-1]
    assert model_key(f" \t{name}\n ") == key
    assert display_name(name) == name.strip()


@PROPERTY
@given(names.filter(lambda n: n.strip() == n and ":" not in n.rsplit("/", 1)[-1]))
def test_it_treats_a_name_without_a_tag_as_latest(name: str):
    assert model_key(name) == model_key(name + ":latest") == name + ":latest"


@PROPERTY
@given(names, names.filter(lambda t: t and ":" not in t and "/" not in t and t.strip() == t))
def test_it_keeps_an_explicit_tag(name: str, tag: str):
    base = name.strip()
    if base and ":" not in base.rsplit("/", 1)[-1]:
        assert model_key(f"{base}:{tag}") == f"{base}:{tag}"
        assert model_key(f"{base}:{tag}") != model_key(base) or tag == "latest"


# --------------------------------------------------------------------------- streams


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` split at the given offsets (any order, duplicates allowed)."""
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


cut_points = st.lists(st.integers(min_value=0, max_value=10**6), max_size=30)


@st.composite
def ndjson_streams(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """An Ollama stream: chunks, then the final line with the counts."""
    lines: list[dict[str, Any]] = [
        {"model": "m", "message": {"role": "assistant", "content": draw(st.text(max_size=12))}, "done": False}
        for _ in range(draw(st.integers(0, 6)))
    ]
    final = {
        "model": "m",
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": draw(counts),
        "eval_count": draw(counts),
        "extra": draw(json_values),
    }
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    encoded = [json.dumps(x, ensure_ascii=draw(st.booleans())).encode() for x in [*lines, final]]
    body = newline.join(encoded) + draw(st.sampled_from([b"", b"\n", newline]))
    return body, final


@PROPERTY
@given(ndjson_streams(), cut_points)
def test_it_finds_the_same_final_counts_in_an_ndjson_stream_however_it_is_cut(
    stream: tuple[bytes, dict[str, Any]], points: list[int]
):
    body, final = stream
    whole, pieces = NdjsonScanner(), NdjsonScanner()
    assert whole.feed(body) == body
    passed = b"".join(pieces.feed(chunk) for chunk in cut(body, points))
    assert passed == body  # passed through untouched
    assert whole.final() == pieces.final() == final
    assert ollama_counts(pieces.final()) == Counts(final["prompt_eval_count"], final["eval_count"])


def _event(payload: Any, crlf: bool) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    sep = "\r\n" if crlf else "\n"
    return f"data: {text}{sep}{sep}".encode()


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[list[bytes], int | None, Counts | None]:
    """An OpenAI stream as events: (events, index of the usage-only event, its usage)."""
    crlf = draw(st.booleans())
    events: list[bytes] = []
    for i in range(draw(st.integers(0, 6))):
        chunk: dict[str, Any] = {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": draw(st.text(max_size=10))}}],
        }
        if draw(st.booleans()):
            chunk["usage"] = None  # what OpenAI sends in every chunk once usage is asked for
        events.append(_event(chunk, crlf))
        if draw(st.booleans()) and i == 0:
            events.append(b": keep-alive\r\n\r\n" if crlf else b": keep-alive\n\n")
    usage_at: int | None = None
    usage: Counts | None = None
    if draw(st.booleans()):
        usage = Counts(draw(counts), draw(counts))
        body = {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "total_tokens": usage.total,
            },
        }
        usage_at = len(events)
        events.append(_event(body, crlf))
    if draw(st.booleans()):
        events.append(_event("[DONE]", crlf))
    return events, usage_at, usage


def run_sse(data: bytes, points: list[int], *, strip: bool) -> tuple[bytes, SseScanner]:
    scanner = SseScanner(strip_usage=strip)
    out = b"".join(scanner.feed(chunk) for chunk in cut(data, points)) + scanner.flush()
    return out, scanner


@PROPERTY
@given(sse_streams(), cut_points, st.booleans())
def test_it_relays_the_same_sse_bytes_and_usage_however_the_stream_is_cut(
    stream: tuple[list[bytes], int | None, Counts | None], points: list[int], strip: bool
):
    events, _, usage = stream
    data = b"".join(events)
    whole, whole_scanner = run_sse(data, [], strip=strip)
    pieces, pieces_scanner = run_sse(data, points, strip=strip)
    assert pieces == whole
    assert pieces_scanner.usage == whole_scanner.usage == usage
    assert pieces_scanner.done == whole_scanner.done == (b"[DONE]" in data)


@PROPERTY
@given(sse_streams(), cut_points)
def test_it_strips_exactly_the_usage_only_event(
    stream: tuple[list[bytes], int | None, Counts | None], points: list[int]
):
    events, usage_at, _ = stream
    data = b"".join(events)
    kept = b"".join(e for i, e in enumerate(events) if i != usage_at)
    stripped, _ = run_sse(data, points, strip=True)
    untouched, _ = run_sse(data, points, strip=False)
    normalise = lambda b: b.replace(b"\r\n", b"\n")  # noqa: E731  (events may end in CRLF)
    assert stripped == normalise(kept)
    assert untouched == normalise(data)


@PROPERTY
@given(st.binary(max_size=400), cut_points, st.booleans())
def test_it_never_fails_on_arbitrary_bytes(data: bytes, points: list[int], strip: bool):
    ndjson = NdjsonScanner()
    assert b"".join(ndjson.feed(chunk) for chunk in cut(data, points)) == data
    ndjson.final()  # None or whatever the last line parses to, never an exception
    run_sse(data, points, strip=strip)


@pytest.mark.parametrize("strip", [False, True])
def test_it_ends_an_sse_event_whose_crlf_blank_line_arrives_in_the_next_chunk(strip: bool):
    """Found by the property above: `...[DONE]\r\n` then `\r\n` was not seen as an event's end."""
    scanner = SseScanner(strip_usage=strip)
    first = scanner.feed(b'data: {"choices": [{"delta": {}}]}\r\n\r\ndata: [DONE]\r\n')
    assert first == b'data: {"choices": [{"delta": {}}]}\n\n'
    assert scanner.feed(b"\r\n") == b"data: [DONE]\n\n"  # at once, not at the end of the stream
    assert scanner.done and scanner.flush() == b""
