"""Shared actors of the suite, described in words.

- `fakes`: starts fake backends (bench/fake_backend.py) on loopback ports, in threads.
- `router`: starts the real router, `daphne nomyo_site.asgi:application`, as a separate
  process on a free loopback port, against the test database; stops it at the end.
- `endpoint`: registers an endpoint in the test database (committed, so the router
  process sees it).
- `clear_of_minute_edge`: waits out the end of a UTC minute before a test counts per minute.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.fake_backend import FakeConfig, ThreadedFake, run_in_thread
from bench.procs import router_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """SQLite tests use a file, so the router process can open the same database."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        (REPO / "var").mkdir(exist_ok=True)
        db["TEST"]["NAME"] = str(REPO / "var" / f"test-{os.getpid()}.sqlite3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url() -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


@pytest.fixture
def fakes() -> Iterator[Callable[..., ThreadedFake]]:
    started: list[ThreadedFake] = []

    def start(**config: Any) -> ThreadedFake:
        fake = run_in_thread(FakeConfig(**config))
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def endpoint(transactional_db: None) -> Callable[..., Any]:
    from routing.models import Endpoint

    def register(url: str, **fields: Any) -> Endpoint:
        fields.setdefault("name", f"ep{Endpoint.objects.count() + 1}")
        return Endpoint.objects.create(url=url, **fields)

    return register


@dataclass
class RouterProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def start_router(tmp_path: Path, *, server: str = "daphne", **env: str) -> RouterProcess:
    port = free_port()
    full_env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "ROUTER_FLUSH_INTERVAL": "0.5",
        "ROUTER_REGISTRY_RELOAD": "0.2",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    full_env.pop("DJANGO_SETTINGS_MODULE", None)
    log_path = tmp_path / f"router-{port}.log"
    cmd = router_command(server, port)  # as `make run` (daphne) and `make serve-uvicorn` start it
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    router = RouterProcess(port, proc, log_path, env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited at start:\n{router.log()}")
        try:
            httpx.get(router.url + "/api/tags", timeout=1)
            return router
        except httpx.HTTPError:
            time.sleep(0.1)
    router.stop()
    raise RuntimeError(f"router did not answer in 30 s:\n{router.log()}")


@pytest.fixture
def router(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    started: list[RouterProcess] = []

    def start(**env: str) -> RouterProcess:
        proc = start_router(tmp_path, **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
        print(f"--- router log ({proc.url}) ---\n{proc.log()[-20000:]}")  # shown when a test fails


def clear_of_minute_edge(margin: float = 5.0) -> None:
    """Wait, when fewer than `margin` seconds are left of this UTC minute, until the next one has
    begun. Per-minute limits (rpm, tpm) count in calendar minutes: requests that straddle two
    minutes see their count start again, which is right for the router and wrong for a test that
    expects its third request to be over a limit of 3."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _redis_not_suspended() -> Iterator[None]:
    """A test whose Redis timed out (real or simulated) does not make the next tests skip Redis
    for RETRY_AFTER seconds (routing/core/outage.py: the suspension is process-wide)."""
    from routing.core import redis as core_redis

    core_redis.suspension.timed_out_at = None
    yield
    core_redis.suspension.timed_out_at = None
