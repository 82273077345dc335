"""Fixtures of the engine tests.

- `book`: a fresh `Book` (sinks.py) installed as the only accounting sink, on a clean engine
  (local mode, an empty board, no breaker open, no endpoint refused), cleaned again afterwards.
  A module may define its own `book` (test_accounting.py does).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from routing.engine.board import board
from routing.fleet.breaker import breakers
from routing.fleet.refusals import refusals
from tests.routing.engine.sinks import Book, install_only


def _clean() -> None:
    board.clear()
    breakers.forget()
    refusals.forget()


@pytest.fixture
def book(monkeypatch: pytest.MonkeyPatch, settings) -> Iterator[Book]:
    settings.REDIS_URL = ""
    kept = Book()
    install_only(monkeypatch, kept)
    _clean()
    yield kept
    _clean()
