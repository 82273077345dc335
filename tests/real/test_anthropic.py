"""The official `anthropic` client through the router to a real llama.cpp server (Messages API
translated onto its /v1/chat/completions).

Each reply is checked against what llama-server answers to the same chat request sent
directly (temperature 0: greedy, the same tokens and the same usage), and the router's token
totals against the usage the server reported.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import wait_until
from tests.real.conftest import Real
from tests.real.llama import ALIAS
from tests.reliability.support import db_totals

PROMPT = "Name three colours."
MAX_TOKENS = 12


def direct(real: Real) -> dict[str, Any]:
    """The chat request the router sends, straight to llama-server A."""
    body = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    reply = httpx.post(real.llamas[0].v1 + "/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


@pytest.fixture
def real(real_router) -> Real:
    return real_router()


@pytest.fixture
def client(real: Real) -> Any:
    return anthropic.Anthropic(base_url=real.url, api_key="unused", max_retries=0, timeout=60)


def _ask(client: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": ALIAS,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
        "extra_body": {"temperature": 0},
        **extra,
    }


def test_a_whole_and_a_streamed_message_match_the_server_and_are_counted_as_it_reported(real, client):
    expected = direct(real)
    text = expected["choices"][0]["message"]["content"]
    usage = expected["usage"]
    whole = client.messages.create(**_ask(client))
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text == text
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert whole.stop_reason == (
        "max_tokens" if expected["choices"][0]["finish_reason"] == "length" else "end_turn"
    )
    with client.messages.stream(**_ask(client)) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.content[0].text == text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    counted = client.messages.count_tokens(model=ALIAS, messages=[{"role": "user", "content": PROMPT}])
    assert counted.input_tokens == usage["prompt_tokens"]
    # the direct request is not the router's: three through it, each as the server reported
    # (count_tokens generated one token, or none if the model ended at once)
    wait_until(lambda: db_totals(real.llamas[0].v1).requests == 3, timeout=20)
    totals = db_totals(real.llamas[0].v1)
    assert totals.input == 3 * usage["prompt_tokens"] and totals.incomplete == 0
    assert totals.output - 2 * usage["completion_tokens"] in (0, 1)
