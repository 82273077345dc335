"""Actors of the real-server suite.

- `llama_pair`: two llama-server processes (tests/real/llama.py), started once per session,
  each serving Gemma 3 270M as `gemma3-270m` for chat, completions and embeddings. A test
  may kill one; the next test that asks for the pair gets it restarted.
- `real`: the real router (tests/conftest.py `router`) with llama-server A registered as an
  OpenAI-compatible endpoint; `real_two` registers both.

Without the binary or the model these tests skip with the reason, except under CI (CI set),
where they fail: `make test` installs both, so a missing one there is a broken install.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RouterProcess, free_port
from tests.real import llama
from tests.real.llama import LlamaServer


def _require_install() -> None:
    try:
        llama.binary_path()
        llama.model_path()
    except llama.Missing as exc:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"real llama-server tests cannot run under CI: {exc}", pytrace=False)
        pytest.skip(f"real llama-server tests skipped: {exc}")


class Pair:
    """Two llama-servers on fixed loopback ports; `ensure()` restarts any that died."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.ports = [free_port(), free_port()]
        self.servers: list[LlamaServer | None] = [None, None]

    def ensure(self) -> list[LlamaServer]:
        for i, server in enumerate(self.servers):
            if server is None or not server.alive():
                self.servers[i] = llama.start(self.ports[i], self.log_dir)
        return [s for s in self.servers if s is not None]

    def stop(self) -> None:
        for server in self.servers:
            if server is not None:
                server.stop()


@pytest.fixture(scope="session")
def llama_pair_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    _require_install()
    pair = Pair(tmp_path_factory.mktemp("llama"))
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
def llama_pair(llama_pair_session: Pair) -> Iterator[list[LlamaServer]]:
    servers = llama_pair_session.ensure()
    yield servers
    for server in servers:  # shown when a test fails
        print(f"--- llama-server log ({server.url}) ---\n{server.log(3000)}")


@dataclass
class Real:
    router: RouterProcess
    llamas: list[LlamaServer]  # the registered ones, in registration order
    names: list[str]  # their endpoint names

    @property
    def url(self) -> str:
        return self.router.url


@pytest.fixture
def real_router(
    llama_pair: list[LlamaServer], endpoint: Callable[..., Any], router: Callable[..., RouterProcess]
) -> Callable[..., Real]:
    """start(count=1, limit=2, **router_env): register `count` llama-servers, start the router."""

    def start(count: int = 1, limit: int = 2, **env: str) -> Real:
        llamas = llama_pair[:count]
        names = [f"llama-{chr(ord('a') + i)}" for i in range(count)]
        for name, server in zip(names, llamas, strict=True):
            endpoint(server.v1, name=name, kind="openai", max_concurrent_connections=limit)
        return Real(router(**env), llamas, names)

    return start
