"""Endpoints disabled or deleted while requests run on them: those finish normally (and
are counted), new requests go to the endpoints that remain."""

from __future__ import annotations

import time

import httpx
import pytest

from routing.fleet import services
from routing.models import Endpoint
from tests.conftest import wait_until
from tests.reliability.support import (
    MODEL_KEY,
    PROMPT_TOKENS,
    RawRequest,
    Totals,
    chat_body,
    wait_db_totals,
    wait_idle,
)

pytestmark = pytest.mark.timeout(60)

DONE = {"/api/chat": b'"done":true', "/v1/chat/completions": b"data: [DONE]"}


@pytest.mark.parametrize("change", ["disabled", "deleted"])
def test_it_lets_requests_finish_on_an_endpoint_that_is_taken_away_and_sends_new_ones_elsewhere(
    change, fakes, endpoint, router
):
    # `old` has the model loaded and a free slot left, so it would keep getting requests
    old = fakes(models=[MODEL_KEY], loaded=[MODEL_KEY], tokens=30, delay=0.05)
    new = fakes(models=[MODEL_KEY], tokens=3)
    ep_old = endpoint(old.url, name="old", max_concurrent_connections=3)
    endpoint(new.url, name="new", max_concurrent_connections=3)
    server = router()
    running = {path: RawRequest.post_json(server, path, chat_body(stream=True)) for path in DONE}
    for request in running.values():
        assert request.status() == 200 and request.header("x-router-endpoint") == "old"
    wait_until(lambda: old.stats.in_flight == {MODEL_KEY: 2}, timeout=3)
    if change == "disabled":
        services.endpoints_set_enabled(endpoint_ids=[ep_old.id], enabled=False)
    else:
        Endpoint.objects.filter(id=ep_old.id).delete()
        services.endpoints_changed([ep_old.id])
    time.sleep(0.5)  # the router process re-reads its registry every 0.2 s in tests
    for _ in range(3):
        response = httpx.post(server.url + "/api/chat", json=chat_body(stream=False), timeout=10)
        assert response.status_code == 200 and response.headers["x-router-endpoint"] == "new"
    assert old.stats.in_flight == {MODEL_KEY: 2}  # still running, untouched
    for path, request in running.items():
        body = request.read_to_end()
        assert DONE[path] in body and b'"error"' not in body
        request.close()
    wait_idle(server)
    assert old.stats.completed == 2 and old.stats.cancelled == 0
    wait_db_totals(Totals(2 * PROMPT_TOKENS, 60, 2, 0), old.url, settle=False)
    wait_db_totals(Totals(3 * PROMPT_TOKENS, 9, 3, 0), new.url)
