"""Statistics over real sockets (issue 12, item 8): a model is found in any spelling the
model lists show, and every request counts, with tokens when the server reported them.

The router is a real daphne process in front of fake backends; requests go through it,
the recorder flushes to the test database, and the statistics routes are asked over HTTP.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from stats.models import TokenTimeSeries, TokenTotal
from tests.conftest import wait_until
from tests.reliability.support import MODEL, MODEL_KEY, PROMPT_TOKENS, Totals, chat_body, wait_db_totals

pytestmark = pytest.mark.timeout(120)

GEMMA = "gemma3-270m"
OLD_ROW_TOKENS = (11, 13)  # a row stored under the bare name, as an older version did


def _stats(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/api/stats", json={"model": model}, timeout=10)


def _reported(*fakes) -> tuple[int, int]:
    snaps = [f.stats.snapshot() for f in fakes]
    return (
        sum(s["prompt_tokens_reported"] for s in snaps),
        sum(s["completion_tokens_reported"] for s in snaps),
    )


def test_every_stats_route_finds_a_model_in_any_spelling_the_lists_show(fakes, endpoint, router):
    # An Ollama server lists the model with its tag, a llama.cpp-like server without.
    ollama = fakes(kind="ollama", models=[f"{GEMMA}:latest"], tokens=5)
    llama_cpp = fakes(kind="openai", models=[GEMMA], tokens=7)
    endpoint(ollama.url, name="ollama", max_concurrent_connections=4)
    endpoint(llama_cpp.url + "/v1", name="llama-cpp", kind="openai", max_concurrent_connections=4)
    minute = datetime.now(tz=UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    TokenTotal.objects.create(
        endpoint="http://old:1", model=GEMMA, input_tokens=11, output_tokens=13, total_tokens=24, requests=1
    )
    TokenTimeSeries.objects.create(
        endpoint="http://old:1", model=GEMMA, timestamp=minute, input_tokens=11, output_tokens=13,
        total_tokens=24, requests=1,
    )  # fmt: skip
    server = router()
    for path, model in (
        ("/api/chat", GEMMA),
        ("/v1/chat/completions", GEMMA),
        ("/api/chat", f"{GEMMA}:latest"),
    ):
        for stream in (False, True):
            reply = httpx.post(server.url + path, json=chat_body(stream=stream, model=model), timeout=10)
            assert reply.status_code == 200, reply.text
    prompt, completion = _reported(ollama, llama_cpp)
    assert prompt > 0 and completion > 0
    wait_until(lambda: sum(r.requests for r in TokenTotal.objects.all()) == 7, timeout=10)

    listed = {m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]}
    listed |= {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert listed & {GEMMA, f"{GEMMA}:latest"}
    # what the lists show, both spellings (llama-server lists the bare name)
    answers = {}
    for name in sorted(listed | {GEMMA, f"{GEMMA}:latest"}):
        reply = _stats(server.url, name)
        assert reply.status_code == 200, (name, reply.text)
        data = reply.json()
        assert data["model"] == name
        answers[name] = {k: v for k, v in data.items() if k != "model"}
        inp, out = prompt + OLD_ROW_TOKENS[0], completion + OLD_ROW_TOKENS[1]
        assert (data["input_tokens"], data["output_tokens"], data["requests"]) == (inp, out, 7)
        assert data["range_totals"] == {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": inp + out,
            "requests": 7,
        }
        assert sum(p["total_tokens"] for p in data["time_series"]) == inp + out
    assert len({repr(a) for a in answers.values()}) == 1  # one model: the same answer for each spelling

    for name in (GEMMA, f"{GEMMA}:latest"):
        text = httpx.get(server.url + "/api/stats.csv", params={"model": name}, timeout=10).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert {r["model"] for r in rows} == {GEMMA, f"{GEMMA}:latest"}
        assert sum(int(r["total_tokens"]) for r in rows) == prompt + completion + sum(OLD_ROW_TOKENS)
        assert sum(int(r["requests"]) for r in rows) == 7
    assert _stats(server.url, "gemma3-270m:q8").status_code == 404  # another tag is another model
    assert _stats(server.url, "gemma3").status_code == 404
    # the statistics accept exactly the spellings the routes accept (routing/core/names.py)
    for name in [f" {GEMMA}", f"{GEMMA} ", f"\t{GEMMA}:latest", f"{GEMMA}:latest:latest", f"{GEMMA}::latest"]:
        routed = httpx.post(server.url + "/api/chat", json=chat_body(stream=False, model=name), timeout=10)
        stats = _stats(server.url, name)
        assert routed.status_code == stats.status_code and stats.status_code in (400, 404), (name, stats.text)


def test_a_request_without_reported_usage_still_counts_as_a_request(fakes, endpoint, router):
    fake = fakes(kind="ollama", models=[MODEL_KEY], tokens=8)
    endpoint(fake.url, name="solo", max_concurrent_connections=2)
    server = router()
    paths = ("/api/chat", "/v1/chat/completions")
    for i in range(5):  # streamed, the server reports usage
        reply = httpx.post(server.url + paths[i % 2], json=chat_body(stream=True), timeout=10)
        assert reply.status_code == 200
    fake.config.fault = "garbage"  # a 200 whose stream carries no usage
    for i in range(3):
        reply = httpx.post(server.url + paths[i % 2], json=chat_body(stream=True), timeout=10)
        assert reply.status_code == 200 and reply.content == b"this is not json\n"
    # every request counts; tokens only where they were reported (none invented)
    wait_db_totals(Totals(5 * PROMPT_TOKENS, 5 * 8, 8, 3))
    assert sum(r.requests for r in TokenTimeSeries.objects.all()) == 8

    data = _stats(server.url, MODEL).json()
    assert (data["input_tokens"], data["output_tokens"], data["requests"]) == (5 * PROMPT_TOKENS, 40, 8)
    assert data["range_totals"]["requests"] == 8
    assert sum(p["requests"] for p in data["time_series"]) == 8
    counts = httpx.get(server.url + "/api/token_counts").json()
    assert [(b["model"], b["requests"], b["total_tokens"]) for b in counts["breakdown"]] == [
        (MODEL_KEY, 8, 5 * (PROMPT_TOKENS + 8))
    ]
    assert counts["total_tokens"] == 5 * (PROMPT_TOKENS + 8)
