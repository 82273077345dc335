"""The quota tests count per UTC minute: none of them starts in the last seconds of one."""

from __future__ import annotations

import pytest

from tests.conftest import clear_of_minute_edge


@pytest.fixture(autouse=True)
def _clear_of_minute_edge() -> None:
    clear_of_minute_edge()
