"""Test helper: the accounting sinks (routing/engine/accounting.py) replaced, for one test,
by the given ones alone."""

from __future__ import annotations

import pytest

from routing.engine import accounting
from routing.engine.accounting import AccountingSink, Sinks


def install_only(monkeypatch: pytest.MonkeyPatch, *sinks: AccountingSink) -> None:
    """Until the test ends, the forwarding path reports to `sinks` and nothing else."""
    only = Sinks()
    for sink in sinks:
        only.install(sink)
    monkeypatch.setattr(accounting.sinks, "_sinks", only.installed)
