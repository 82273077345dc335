"""The router under uvicorn too: lifespan start-up, proxying, and the shutdown flush."""

from __future__ import annotations

import signal

import httpx
import ollama

from stats.models import TokenTotal
from tests.conftest import start_router


def test_it_serves_and_flushes_under_uvicorn(fakes, endpoint, transactional_db, tmp_path):
    fake = fakes(kind="ollama", models=["llama3:latest"], tokens=4)
    endpoint(fake.url, max_concurrent_connections=2)
    server = start_router(tmp_path, server="uvicorn", ROUTER_FLUSH_INTERVAL="3600")
    try:
        client = ollama.Client(host=server.url)
        for _ in range(3):
            assert client.chat(model="llama3", messages=[{"role": "user", "content": "a b"}]).eval_count == 4
        assert httpx.get(server.url + "/api/version").json() == {"version": "0.12.0"}
    finally:
        # uvicorn re-raises the signal after its graceful shutdown
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM), server.log()
    assert "Application shutdown complete" in server.log()
    row = TokenTotal.objects.get()
    assert (row.output_tokens, row.requests) == (12, 3)
