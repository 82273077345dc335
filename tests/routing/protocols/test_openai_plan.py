"""What an OpenAI-route request sends upstream (routing/openai_views._plan): the client's
bytes untouched when nothing changes, usage asked for when the client did not, and the
backend's own model name when it differs."""

from __future__ import annotations

import json

import pytest

from routing.fleet.candidates import Candidate
from routing.fleet.registry import EndpointInfo
from routing.protocols.openai.views import _plan


def cand(backend_model: str) -> Candidate:
    info = EndpointInfo(
        id=1, name="oa", url="http://127.0.0.1:9001/v1", kind="openai", api_key="", enabled=True, limit=1
    )
    return Candidate(info, backend_model, False)


BODIES = [
    b'{"model":"m","messages":[{"role":"user","content":"hi }"}],"stream":true}',
    b'{\n  "model": "m",\n  "messages": [],\n  "stream": true\n}\n\r\n  ',
]


@pytest.mark.parametrize("raw", BODIES)
def test_a_stream_without_include_usage_gets_it_and_nothing_else_changes(raw: bytes) -> None:
    data = json.loads(raw)
    attempt = _plan("/chat/completions", raw, data, True)(cand("m"))
    sent = json.loads(attempt.body)
    assert sent == {**data, "stream_options": {"include_usage": True}}
    relay = attempt.relay()
    assert relay.feed(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n') == b""


def test_the_clients_bytes_pass_untouched_when_it_asked_for_usage() -> None:
    raw = b'{"model":"m", "stream":true, "stream_options":{"include_usage":true}}'
    attempt = _plan("/chat/completions", raw, json.loads(raw), True)(cand("m"))
    assert attempt.body is raw


def test_other_stream_options_are_kept_and_the_backend_name_is_used() -> None:
    raw = b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false}}'
    attempt = _plan("/chat/completions", raw, json.loads(raw), True)(cand("m:latest"))
    assert json.loads(attempt.body) == {
        "model": "m:latest",
        "stream": True,
        "stream_options": {"continuous_usage_stats": False, "include_usage": True},
    }
