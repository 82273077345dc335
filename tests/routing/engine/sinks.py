"""Test helpers for the accounting sinks (routing/engine/accounting.py): `install_only` puts
the given sinks in place of the installed ones for one test; `Book` is a sink that writes down
what it was told (the `book` fixture of conftest.py installs one)."""

from __future__ import annotations

import pytest

from routing.auth.principal import Principal
from routing.engine import accounting
from routing.engine.accounting import AccountingSink, Counts, Sinks


def install_only(monkeypatch: pytest.MonkeyPatch, *sinks: AccountingSink) -> None:
    """Until the test ends, the forwarding path reports to `sinks` and nothing else."""
    only = Sinks()
    for sink in sinks:
        only.install(sink)
    monkeypatch.setattr(accounting.sinks, "_sinks", only.installed)


class Book:
    """What the sinks were told: (kind, endpoint url, real model, requested), kind "record" or
    "incomplete"."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, str]] = []

    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Counts, *, requested: str = ""
    ) -> None:
        self.entries.append(("record", endpoint, model, requested))

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        self.entries.append(("incomplete", endpoint, model, requested))
