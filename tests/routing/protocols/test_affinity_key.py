"""The affinity key of a request (routing/protocols/common/affinity.py): a session header first,
then the OpenAI `user` field, then the prompt's stable prefix; the same for every turn of one
conversation, different between conversations, bounded whatever the client sends."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import RequestFactory

from routing.auth.principal import ANONYMOUS
from routing.protocols.common.affinity import affinity_key
from routing.server.lean_asgi import ProxyRequest

SYSTEM = {"role": "system", "content": "You are a careful assistant."}


def request(path: str = "/api/chat", session: str | None = None) -> ProxyRequest:
    headers = [(b"content-type", b"application/json")]
    if session is not None:
        headers.append((b"x-session-id", session.encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    return ProxyRequest(scope, b"{}", ANONYMOUS)


def conversation(opening: str, turns: int) -> list[list[dict[str, Any]]]:
    """The `messages` of each turn: turn k+1 repeats turn k's messages and the reply."""
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": opening}]
    out = [list(messages)]
    for k in range(1, turns):
        messages.append({"role": "assistant", "content": f"answer {k}"})
        messages.append({"role": "user", "content": f"more {k}"})
        out.append(list(messages))
    return out


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_every_turn_of_a_conversation_has_the_same_key_and_conversations_differ(path: str) -> None:
    a = {affinity_key(request(path), {"messages": m}, path) for m in conversation("tell me about tides", 6)}
    b = {affinity_key(request(path), {"messages": m}, path) for m in conversation("and about volcanoes", 6)}
    assert len(a) == 1 and len(b) == 1 and a != b
    assert str(next(iter(a))).startswith("p:")


def test_a_session_header_comes_first_then_the_user_field_then_the_prompt() -> None:
    body = {"messages": conversation("hello", 1)[0], "user": "user-42"}
    by_session = affinity_key(request(session="conv-1"), body, "/v1/chat/completions")
    assert by_session is not None and by_session.startswith("s:")
    assert by_session == affinity_key(request(session="conv-1"), {"messages": []}, "/v1/chat/completions")
    assert by_session != affinity_key(request(session="conv-2"), body, "/v1/chat/completions")
    by_user = affinity_key(request(), body, "/v1/chat/completions")
    assert by_user is not None and by_user.startswith("u:")
    by_prompt = affinity_key(request(), {"messages": body["messages"]}, "/v1/chat/completions")
    assert by_prompt is not None and by_prompt.startswith("p:")
    assert len({by_session, by_user, by_prompt}) == 3


def test_the_session_header_is_read_from_a_django_request_too() -> None:
    plain = RequestFactory().post("/api/chat", HTTP_X_SESSION_ID="conv-1")
    assert affinity_key(plain, {}, "/api/chat") == affinity_key(request(session="conv-1"), {}, "/api/chat")


def test_openai_content_parts_and_ollama_strings_are_both_keyed() -> None:
    parts = [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image_url", "image_url": {"url": "data:x"}},
    ]
    one = affinity_key(request(), {"messages": [{"role": "user", "content": parts}]}, "/v1/chat/completions")
    other = affinity_key(
        request(), {"messages": [{"role": "user", "content": parts[:1]}]}, "/v1/chat/completions"
    )
    assert one is not None and other is not None and one != other


def test_generate_keys_on_system_and_the_prompts_start_and_on_context_for_a_continuation() -> None:
    long_start = "x" * 600
    first = affinity_key(request(), {"system": "s", "prompt": long_start + " one"}, "/api/generate")
    later = affinity_key(request(), {"system": "s", "prompt": long_start + " one ... two"}, "/api/generate")
    other_system = affinity_key(request(), {"system": "t", "prompt": long_start}, "/api/generate")
    assert first == later != other_system
    ctx = list(range(300))
    turn2 = affinity_key(request(), {"prompt": "next", "context": ctx}, "/api/generate")
    turn3 = affinity_key(request(), {"prompt": "and next", "context": [*ctx, 7, 8, 9]}, "/api/generate")
    assert turn2 == turn3


def test_completions_key_on_the_prompts_start_as_text_or_tokens() -> None:
    text = "y" * 600
    assert affinity_key(request(), {"prompt": text + "a"}, "/v1/completions") == affinity_key(
        request(), {"prompt": [text + "b", "other"]}, "/v1/completions"
    )
    tokens = list(range(200))
    assert affinity_key(request(), {"prompt": tokens}, "/v1/completions") == affinity_key(
        request(), {"prompt": [*tokens, 1, 2]}, "/v1/completions"
    )


def test_nothing_to_key_on_gives_no_key() -> None:
    assert affinity_key(request(), {}, "/api/chat") is None
    assert affinity_key(request(), {"messages": []}, "/api/chat") is None
    assert affinity_key(request(), {"prompt": ""}, "/v1/completions") is None
    assert affinity_key(request(), {"user": ""}, "/v1/completions") is None


def test_keys_are_bounded_whatever_the_client_sends() -> None:
    huge = "z" * 5_000_000
    keys = [
        affinity_key(request(session=huge[:100_000]), {}, "/api/chat"),
        affinity_key(request(), {"user": huge}, "/v1/chat/completions"),
        affinity_key(request(), {"messages": [{"role": "user", "content": huge}] * 1000}, "/api/chat"),
        affinity_key(request(), {"messages": [{"role": "user", "content": "\ud800 alone"}]}, "/api/chat"),
    ]
    assert all(k is not None and len(k) == 34 for k in keys)


def _anthropic_turns(opening: str, n: int) -> list[list[dict[str, Any]]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": opening}]}]
    out = [list(messages)]
    for k in range(1, n):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {k}"}]})
        messages.append({"role": "user", "content": f"more {k}"})
        out.append(list(messages))
    return out


def test_anthropic_messages_are_keyed_by_system_and_opening_then_by_metadata_user_id() -> None:
    # /v1/messages was routed without any affinity key: Claude Code's turns were spread.
    path = "/v1/messages"
    system = [{"type": "text", "text": "You are Claude Code."}]
    a = {
        affinity_key(request(path), {"system": system, "messages": m}, path)
        for m in _anthropic_turns("fix", 5)
    }
    b = {
        affinity_key(request(path), {"system": system, "messages": m}, path)
        for m in _anthropic_turns("add", 5)
    }
    other = affinity_key(request(path), {"system": "other", "messages": _anthropic_turns("fix", 1)[0]}, path)
    assert len(a) == 1 and len(b) == 1 and a != b and other not in a
    assert str(next(iter(a))).startswith("p:")
    body = {"messages": _anthropic_turns("fix", 1)[0], "metadata": {"user_id": "session-7"}}
    by_user = affinity_key(request(path), body, path)
    assert by_user is not None and by_user.startswith("u:")
    assert by_user == affinity_key(request(path), {**body, "messages": _anthropic_turns("x", 3)[2]}, path)
