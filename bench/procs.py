"""The processes of `make bench`: fake backends and routers, each in its own session so it
can be stopped with everything it started; plus /proc readings (RSS, CPU time)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int
    url: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)  # its own session: this process and its children
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    # -- /proc readings ----------------------------------------------------------------
    def status_kb(self, key: str) -> int:
        """A `kB` field of /proc/PID/status (VmRSS, VmHWM), 0 when gone."""
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        try:
            with open(f"/proc/{self.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def threads(self) -> int:
        return self.status_kb("Threads")


def _spawn(
    name: str, cmd: list[str], env: dict[str, str], log_dir: Path, port: int, url: str, cwd: Path = REPO
) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log_path, port, url)


def _wait_http(proc: Proc, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited at start:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(proc.url + path, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer: the server is up (a router without endpoints says 503)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not answer {path} in {timeout:g} s:\n{proc.log_tail()}")


def start_fake(
    name: str, *, kind: str, models: list[str], tokens: int, delay: float, log_dir: Path, pad: int = 0
) -> Proc:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.fake_backend",
        "--kind",
        kind,
        "--port",
        str(port),
        "--models",
        ",".join(models),
        "--tokens",
        str(tokens),
        "--delay",
        f"{delay:g}",
        "--pad",
        str(pad),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = _spawn(name, cmd, env, log_dir, port, f"http://127.0.0.1:{port}")
    _wait_http(proc, "/_fake/config", 20)
    return proc


def router_command(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            str(VENV_BIN / "uvicorn"),
            "nomyo_site.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ]
    if server == "daphne":
        return [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "nomyo_site.asgi:application"]
    raise ValueError(f"unknown server {server!r}")


def start_router(
    server: str,
    *,
    database_url: str,
    log_dir: Path,
    name: str | None = None,
    cwd: Path = REPO,
    extra_env: dict[str, str] | None = None,
) -> Proc:
    """The router as `make run` starts it; `cwd` may be another checkout (for A/B comparisons);
    `extra_env`: more environment (ROUTER_API_KEY, REDIS_URL, ...)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    proc = _spawn(name or f"router-{server}", router_command(server, port), env, log_dir, port, "", cwd)
    proc.url = f"http://127.0.0.1:{port}"
    _wait_http(proc, "/api/tags", 60)
    return proc


def manage(*args: str, database_url: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, check=check
    )


def dbtool(*args: str, database_url: str) -> str:
    """Run bench/dbtool.py (Django set up against `database_url`); its stdout."""
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dbtool", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.dbtool {args[0]} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def fleet_database(path: Path, endpoints: list[dict[str, Any]]) -> str:
    """A SQLite database at `path`, migrated, with `endpoints` registered (bench/dbtool.py
    `endpoints` rows: name, url, kind, limit); its DATABASE_URL."""
    url = f"sqlite:///{path}"
    manage("migrate", "--noinput", "-v", "0", database_url=url)
    dbtool("endpoints", json.dumps(endpoints), database_url=url)
    return url


@dataclass
class RssSampler:
    """Samples a process's VmRSS in a thread; `peak_kb` is the largest sample."""

    proc: Proc
    interval: float = 0.05
    peak_kb: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.status_kb("VmRSS")
            self.peak_kb = max(self.peak_kb, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
