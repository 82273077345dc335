"""Rerank through the real router (/v1/rerank and /rerank, Cohere's and Jina's shapes) against
llama.cpp-like fake servers started with and without `--reranking`."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.helpers import in_flight
from tests.reliability.support import Totals, wait_db_totals

RERANKER = "bge-reranker"
QUERY = "organic skincare for sensitive skin"
DOCS = [
    "new makeup trends focus on bold colors",  # no query word: 0
    "organic skincare for sensitive skin with aloe vera",  # all five words: 1.0
    "skincare tips",  # one word: 0.2
    "sensitive skin needs organic care",  # three: 0.6
]


def _rerank_requests(fake) -> int:
    snap = fake.stats.snapshot()["requests"]
    return snap.get("/v1/rerank", 0) + snap.get("/rerank", 0)


@pytest.fixture
def fleet(fakes, endpoint, router):
    """A llama.cpp-like server with --reranking serving bge-reranker, and an Ollama server with llama3."""
    reranker = fakes(kind="openai", models=[RERANKER], reranking=True)
    ollama_fake = fakes(kind="ollama", models=["llama3:latest"])
    endpoint(reranker.url + "/v1", name="gpu-rerank", kind="openai", max_concurrent_connections=2)
    endpoint(ollama_fake.url, name="gpu-ollama", max_concurrent_connections=2)
    return reranker, ollama_fake, router()


def test_it_reranks_on_both_paths_in_both_shapes_and_counts_the_tokens(fleet):
    reranker, _, server = fleet
    cohere = httpx.post(
        server.url + "/v1/rerank",
        json={"model": RERANKER, "query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True},
        timeout=10,
    )
    assert cohere.status_code == 200, cohere.text
    body = cohere.json()
    assert cohere.headers["X-Router-Endpoint"] == "gpu-rerank"
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == [(1, 1.0), (3, 0.6)]
    assert [r["document"]["text"] for r in body["results"]] == [DOCS[1], DOCS[3]]
    assert body["model"] == RERANKER
    first_tokens = reranker.stats.prompt_tokens_reported
    assert first_tokens > 0
    assert body["usage"] == {"prompt_tokens": first_tokens, "total_tokens": first_tokens}
    assert body["meta"]["billed_units"] == {"search_units": 1, "input_tokens": first_tokens}
    # the upstream got plain strings and the client's top_n
    sent = reranker.stats.bodies_for("/v1/rerank")[-1]
    assert sent["documents"] == DOCS and sent["top_n"] == 2 and sent["model"] == RERANKER

    jina = httpx.post(
        server.url + "/rerank",
        json={"model": RERANKER, "query": {"text": QUERY}, "documents": [{"text": d} for d in DOCS]},
        timeout=10,
    )
    assert jina.status_code == 200, jina.text
    results = jina.json()["results"]
    assert [r["index"] for r in results] == [1, 3, 2, 0]
    assert all("document" not in r for r in results)
    total = reranker.stats.prompt_tokens_reported
    assert jina.json()["usage"]["total_tokens"] == total - first_tokens
    wait_db_totals(Totals(input=total, output=0, requests=2))
    assert in_flight(server.url) == 0


def test_it_answers_501_for_an_ollama_only_model_404_for_an_unknown_one_and_400_for_bad_input(fleet):
    reranker, ollama_fake, server = fleet
    for path in ("/v1/rerank", "/rerank"):
        ollama_only = httpx.post(
            server.url + path, json={"model": "llama3", "query": "q", "documents": ["d"]}, timeout=10
        )
        assert ollama_only.status_code == 501
        error = ollama_only.json()["error"]
        assert "no server serves reranking for model 'llama3'" in error["message"]
        assert error["code"] == "rerank_not_supported"
        unknown = httpx.post(
            server.url + path, json={"model": "nope", "query": "q", "documents": ["d"]}, timeout=10
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    bad_bodies = [
        ({"model": RERANKER, "documents": ["d"]}, "'query' is required"),
        ({"model": RERANKER, "query": "q", "documents": []}, "'documents' must be a non-empty list"),
        ({"model": RERANKER, "query": "q", "documents": [5]}, "'documents[0]' must be a string or an object"),
        ({"model": RERANKER, "query": "q", "documents": ["d"], "top_n": 0}, "'top_n' must be a positive"),
        ({"model": RERANKER, "query": "q", "documents": [{"txt": "d"}]}, "'documents[0].text' is required"),
        ({"query": "q", "documents": ["d"]}, "'model' is required"),
    ]
    for body, message in bad_bodies:
        reply = httpx.post(server.url + "/v1/rerank", json=body, timeout=10)
        assert reply.status_code == 400, body
        assert message in reply.json()["error"]["message"], reply.text
    assert _rerank_requests(reranker) == 0  # nothing bad or unservable went upstream
    assert set(ollama_fake.stats.snapshot()["requests"]) <= {
        "/api/tags",
        "/api/ps",
        "/api/version",
    }  # probes only
    assert in_flight(server.url) == 0


def test_it_passes_over_a_server_without_reranking_and_remembers_it(fakes, endpoint, router):
    plain = fakes(kind="openai", models=[RERANKER], reranking=False)  # llama-server without --reranking
    served = fakes(kind="openai", models=[RERANKER], reranking=True)
    endpoint(plain.url + "/v1", name="plain", kind="openai", max_concurrent_connections=4)
    endpoint(served.url + "/v1", name="served", kind="openai", max_concurrent_connections=4)
    server = router()
    for _ in range(6):
        reply = httpx.post(
            server.url + "/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": DOCS}, timeout=10
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["X-Router-Endpoint"] == "served"
    assert _rerank_requests(plain) <= 1  # refused once at most, then passed over
    assert _rerank_requests(served) == 6
    wait_db_totals(Totals(input=served.stats.prompt_tokens_reported, output=0, requests=6))


def test_it_answers_501_when_the_only_server_refuses_reranking_and_stops_asking_it(fakes, endpoint, router):
    plain = fakes(kind="openai", models=[RERANKER], reranking=False)
    endpoint(plain.url + "/v1", name="plain", kind="openai", max_concurrent_connections=1)
    server = router()
    for _ in range(3):
        reply = httpx.post(
            server.url + "/rerank", json={"model": RERANKER, "query": "q", "documents": ["d"]}, timeout=10
        )
        assert reply.status_code == 501, reply.text
        assert f"no server serves reranking for model '{RERANKER}'" in reply.json()["error"]["message"]
    assert _rerank_requests(plain) == 1
    assert in_flight(server.url) == 0
