"""The quota tests count per UTC minute: none of them starts in the last seconds of one. Their
simulated Redis timeouts test each path as it meets them: no suspension of Redis after a timeout
(routing/core/outage.py), except where a test asks for it (test_redis_hung.py)."""

from __future__ import annotations

import pytest

from routing.core import outage
from tests.conftest import clear_of_minute_edge


@pytest.fixture(autouse=True)
def _clear_of_minute_edge() -> None:
    clear_of_minute_edge()


@pytest.fixture(autouse=True)
def _no_suspension_after_a_timeout(monkeypatch) -> None:
    monkeypatch.setattr(outage, "RETRY_AFTER", 0.0)
