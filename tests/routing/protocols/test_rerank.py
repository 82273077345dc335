"""The rerank reply the client gets from a server's (routing/protocols/openai/rerank.py)."""

from __future__ import annotations

import json

import pytest

from routing.engine.accounting import Counts
from routing.protocols.openai.rerank import reply_body

DOCS = ["a", "b", "c"]


def _reply(results: object, **extra: object) -> bytes:
    return json.dumps({"model": "m", "results": results, **extra}).encode()


def test_it_sorts_by_score_cuts_at_top_n_adds_documents_and_counts_the_prompt_tokens():
    upstream = _reply(
        [
            {"index": 0, "relevance_score": 0.1},
            {"index": 1, "relevance_score": 0.9},
            {"index": 2, "score": 0.5},
        ],
        usage={"prompt_tokens": 30, "total_tokens": 30},
    )
    body, counts = reply_body(upstream, model="asked", documents=DOCS, top_n=2, return_documents=True)
    reply = json.loads(body)
    assert reply["results"] == [
        {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}},
        {"index": 2, "relevance_score": 0.5, "document": {"text": "c"}},
    ]
    assert reply["model"] == "asked" and reply["id"].startswith("rerank-")
    assert reply["usage"] == {"prompt_tokens": 30, "total_tokens": 30}
    assert reply["meta"]["billed_units"] == {"search_units": 1, "input_tokens": 30}
    assert counts == Counts(prompt=30, completion=0)


def test_it_takes_vllm_s_total_tokens_and_reports_nothing_it_was_not_told():
    body, counts = reply_body(
        _reply([{"index": 0, "relevance_score": 1}], usage={"total_tokens": 7}),
        model="m",
        documents=DOCS,
        top_n=None,
        return_documents=False,
    )
    assert counts == Counts(7, 0) and "document" not in json.loads(body)["results"][0]
    body, counts = reply_body(
        _reply([{"index": 0, "relevance_score": 1}]),
        model="m",
        documents=DOCS,
        top_n=None,
        return_documents=False,
    )
    assert counts is None and "usage" not in json.loads(body)


@pytest.mark.parametrize(
    "upstream",
    [
        b"[]",
        json.dumps({"results": "no"}).encode(),
        _reply([{"index": 3, "relevance_score": 1}]),  # out of range
        _reply([{"index": True, "relevance_score": 1}]),
        _reply([{"index": 0, "relevance_score": "high"}]),
        _reply([{"index": 0}]),
        b"not json",
    ],
)
def test_it_refuses_a_malformed_reply(upstream: bytes):
    with pytest.raises(ValueError):
        reply_body(upstream, model="m", documents=DOCS, top_n=None, return_documents=False)
