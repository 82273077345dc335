"""The fixes made to a refused conversation (routing/protocols/common/recovery.py): reading the
servers' overflow and image errors, trimming, dropping images, the hook's once-each rule."""

from __future__ import annotations

import json
from typing import Any

import pytest

from routing.engine.attempt import Attempt, Retry
from routing.fleet.candidates import Candidate
from routing.fleet.context_limits import context_limits
from routing.fleet.registry import EndpointInfo
from routing.protocols.common import recovery
from routing.protocols.common.relays import OpenAIStream, openai_body

LLAMA_CPP = json.dumps(
    {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 5000,
            "n_ctx": 4096,
        }
    }
).encode()
VLLM = json.dumps(
    {
        "object": "error",
        "message": "This model's maximum context length is 8192 tokens. However, you requested 9000 "
        "tokens (8000 in the messages, 1000 in the completion). Please reduce the length.",
        "type": "BadRequestError",
        "code": 400,
    }
).encode()


def test_it_reads_llama_cpp_s_overflow_with_its_numbers():
    assert recovery.overflow(LLAMA_CPP) == recovery.Overflow(n_ctx=4096, n_prompt=5000)


def test_it_reads_vllm_s_overflow_from_its_sentence_at_the_top_level_or_in_error():
    assert recovery.overflow(VLLM) == recovery.Overflow(n_ctx=8192, n_prompt=8000)
    nested = json.dumps({"error": {"message": json.loads(VLLM)["message"]}}).encode()
    assert recovery.overflow(nested) == recovery.Overflow(n_ctx=8192, n_prompt=8000)


def test_it_reads_ollama_s_overflow_without_numbers_and_ignores_other_errors():
    found = recovery.overflow(b'{"error":"the input length exceeds the context length"}')
    assert found == recovery.Overflow(None, None)
    assert (
        recovery.overflow(b'{"error":{"message":"model not found","type":"invalid_request_error"}}') is None
    )
    assert recovery.overflow(b"not json at all") is None


def test_it_knows_the_servers_image_refusals():
    assert recovery.refuses_images(b'{"error":{"message":"image input is not supported - hint: mmproj"}}')
    assert recovery.refuses_images(b'{"error":"failed: this model is missing data required for image input"}')
    assert not recovery.refuses_images(LLAMA_CPP)


def _msg(role: str, words: int = 20, **extra: object) -> dict[str, object]:
    return {"role": role, "content": " ".join(["word"] * words), **extra}


def test_it_drops_the_oldest_turns_first_and_keeps_system_and_the_last_user_message():
    messages = [
        _msg("system"),
        _msg("user"),
        _msg("assistant"),
        _msg("user"),
        _msg("assistant"),
        _msg("user"),
    ]
    fits = sum(recovery.estimate(m) for m in [messages[0], *messages[3:]])
    kept, removed = recovery.trim(messages, target=fits)
    assert removed == 2
    assert kept == [messages[0], messages[3], messages[4], messages[5]]


def test_it_never_drops_the_last_user_message_or_what_follows_it_even_when_that_does_not_fit():
    messages = [_msg("system"), _msg("user"), _msg("assistant"), _msg("user", 500), _msg("assistant")]
    kept, removed = recovery.trim(messages, target=1)
    assert removed == 2 and kept == [messages[0], messages[3], messages[4]]


def test_it_keeps_a_tool_call_and_its_results_together_and_starts_at_a_user_message():
    call = _msg("assistant", 2, tool_calls=[{"id": "c1", "function": {"name": "f", "arguments": "{}"}}])
    messages = [
        _msg("system"),
        _msg("user"),
        call,
        _msg("tool", 50, tool_call_id="c1"),
        _msg("tool", 50, tool_call_id="c1"),
        _msg("assistant"),
        _msg("user"),
    ]
    # Enough to drop the first user message only: the tool group that would then lead goes
    # too (a conversation starts with a user message), and with it both of its results.
    kept, removed = recovery.trim(messages, target=sum(recovery.estimate(m) for m in messages) - 1)
    assert kept == [messages[0], messages[6]]
    assert removed == 5
    assert not any(m["role"] == "tool" for m in kept)


def test_it_trims_nothing_when_it_fits_or_nothing_may_go():
    messages = [_msg("system"), _msg("user")]
    assert recovery.trim(messages, target=10_000) == (messages, 0)
    assert recovery.trim(messages, target=1) == (messages, 0)


def test_it_strips_images_of_both_protocols_and_counts_them():
    body: dict[str, Any] = {
        "images": ["a"],
        "messages": [
            {"role": "user", "content": "x", "images": ["b", "c"]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "t"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                ],
            },
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
        ],
    }
    assert recovery.strip_images(body) == 5
    assert "images" not in body and "images" not in body["messages"][0]
    assert body["messages"][1]["content"] == [{"type": "text", "text": "t"}]
    assert body["messages"][2]["content"] == ""
    assert recovery.strip_images(body) == 0


def _candidate(ep_id: int = 4242) -> Candidate:
    ep = EndpointInfo(
        id=ep_id, name="ep", url="http://127.0.0.1:9/v1", kind="openai", api_key="", enabled=True, limit=1
    )
    return Candidate(ep, "qwen", True)


def _attempt(messages: list[dict[str, object]]) -> Attempt:
    return Attempt(
        url="http://127.0.0.1:9/v1/chat/completions",
        body=json.dumps({"model": "qwen", "messages": messages}).encode(),
        relay=lambda: OpenAIStream(strip_usage=False),
        read_body=openai_body,
        stream=False,
    )


@pytest.fixture
def clean_limits():
    context_limits.forget()
    yield
    context_limits.forget()


def test_the_hook_trims_once_learns_the_limit_and_trims_the_next_attempt_before_sending(
    clean_limits, settings
):
    settings.ROUTER_CONTEXT_TRIM = True
    messages = [_msg("system"), *[_msg(r) for r in ("user", "assistant") * 4], _msg("user")]
    attempt = recovery.guard(_attempt(messages), _candidate())
    assert attempt.recover is not None and attempt.reply_headers == {}
    retry = attempt.recover(attempt, 400, LLAMA_CPP.replace(b"4096", b"100").replace(b"5000", b"200"))
    assert isinstance(retry, Retry)
    sent = json.loads(retry.body)["messages"]
    assert sent[0] == messages[0] and sent[-1] == messages[-1] and len(sent) < len(messages)
    assert retry.headers == {"X-Router-Trimmed": str(len(messages) - len(sent))}
    assert attempt.recover(attempt, 400, LLAMA_CPP) is None  # once per attempt
    assert context_limits.get(4242, "qwen") == 100

    later = recovery.guard(_attempt(messages), _candidate())
    assert "X-Router-Trimmed" in later.reply_headers
    assert len(json.loads(later.body)["messages"]) < len(messages)


def test_the_hook_drops_images_once_and_leaves_other_errors_alone(settings):
    settings.ROUTER_IMAGE_RETRY = True
    parts = [{"type": "text", "text": "t"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    attempt = recovery.guard(_attempt([{"role": "user", "content": parts}]), _candidate(4343))
    assert attempt.recover is not None
    assert attempt.recover(attempt, 400, b'{"error":{"message":"bad temperature"}}') is None
    retry = attempt.recover(attempt, 400, b'{"error":{"message":"image input is not supported"}}')
    assert isinstance(retry, Retry) and retry.headers == {"X-Router-Images-Dropped": "1"}
    assert json.loads(retry.body)["messages"][0]["content"] == [parts[0]]
    assert attempt.recover(attempt, 400, b'{"error":{"message":"image input is not supported"}}') is None


def test_the_settings_turn_each_fix_off(clean_limits, settings):
    settings.ROUTER_CONTEXT_TRIM = False
    settings.ROUTER_IMAGE_RETRY = False
    context_limits.learn(4444, "qwen", 10)
    messages = [_msg("system"), _msg("user"), _msg("assistant"), _msg("user")]
    attempt = recovery.guard(_attempt(messages), _candidate(4444))
    assert json.loads(attempt.body)["messages"] == messages  # no trim before sending
    assert attempt.recover is not None
    assert attempt.recover(attempt, 400, LLAMA_CPP) is None
    assert attempt.recover(attempt, 400, b'{"error":"image input is not supported"}') is None


def test_an_image_counts_as_a_fixed_number_of_tokens_not_its_base64_length():
    screenshot = "A" * 400_000  # 300 KB of PNG, base64
    openai = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is wrong here"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + screenshot}},
        ],
    }
    ollama = {"role": "user", "content": "what is wrong here", "images": [screenshot, screenshot]}
    text_only = recovery.estimate({"role": "user", "content": "what is wrong here"})
    assert recovery.estimate(openai) <= text_only + recovery.IMAGE_TOKENS + 30
    assert recovery.estimate(ollama) <= text_only + 2 * recovery.IMAGE_TOKENS + 30
    assert recovery.estimate(ollama) > 2 * recovery.IMAGE_TOKENS


def test_a_known_context_does_not_trim_a_conversation_for_the_size_of_its_image(clean_limits, settings):
    # A 300 KB screenshot once counted as 100,000 tokens: once a server's context was known,
    # every conversation with an image lost all its earlier messages before it was sent.
    settings.ROUTER_CONTEXT_TRIM = True
    context_limits.learn(4242, "qwen", 8192)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400_000}}
    last: dict[str, object] = {"role": "user", "content": [{"type": "text", "text": "and this?"}, image]}
    messages = [_msg("system"), *[_msg(r) for r in ("user", "assistant") * 4], last]
    attempt = recovery.guard(_attempt(messages), _candidate())
    assert "X-Router-Trimmed" not in attempt.reply_headers
    assert json.loads(attempt.body)["messages"] == messages
