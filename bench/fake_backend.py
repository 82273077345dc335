"""A fast, deterministic fake LLM backend (Ollama or OpenAI/llama.cpp-server-like).

One server emulates one backend.  It is used by the test suite (as a stand-in
for real Ollama / llama.cpp servers) and by the benchmarks (as the *direct*
baseline), so the request path is kept cheap: a single low-level aiohttp
handler, a dict-based route table, pre-encoded chunk fragments and no access
log.

Replies are deterministic:

* completion text is ``"tok0 tok1 ... tok{n-1} "`` (one streamed chunk per token);
* prompt token count is the number of whitespace-separated words across all
  message contents (or the prompt) **plus one**; for embeddings it is the
  number of words (no ``+1``);
* completion token count is ``min(config.tokens, num_predict / max_tokens)``.

With ``prefill`` > 0 a server also has a prompt prefix cache (:class:`PrefixCache`): the time
to first token of a generation is ``prefill`` seconds per prompt token it has not cached, and
``/_fake/stats`` reports its hits under ``"prefix"``.

Usage::

    fake = run_in_thread(FakeConfig(kind="ollama", models=["llama3:latest"]))
    ...  # talk to fake.url
    fake.stop()

or from the command line::

    python -m bench.fake_backend --kind ollama --port 11434 --models a:latest
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import signal
import struct
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import web

__all__ = [
    "FAULTS",
    "KINDS",
    "FakeBackend",
    "FakeConfig",
    "FakeStats",
    "PrefixCache",
    "ThreadedFake",
    "main",
    "run_in_thread",
]

KINDS: Final = frozenset({"ollama", "openai"})
FAULTS: Final = frozenset(
    {
        "none",
        "500",
        "503",
        "reset",
        "die_midstream",
        "stall",
        "garbage",
        "slow_first_byte",
    }
)

#: number of reasoning/thinking chunks emitted before the content when asked.
REASONING_CHUNKS: Final = 2
#: how many request bodies / auth headers the stats keep.
HISTORY: Final = 50

_NDJSON: Final = "application/x-ndjson"
_SSE: Final = "text/event-stream"
_JSON: Final = "application/json"
_GARBAGE: Final = b"this is not json\n"
_MODIFIED_AT: Final = "2024-05-01T12:00:00.000000Z"
_CREATED: Final = 1714564800
_TOOL_ARGS: Final = {"x": 1}
_TOOL_ARGS_STR: Final = json.dumps(_TOOL_ARGS)  # '{"x": 1}'

_ids = itertools.count(1)


def _jb(obj: Any) -> bytes:
    """Compact JSON encoding to bytes."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _json(status: int, obj: Any) -> web.Response:
    return web.Response(status=status, body=_jb(obj), content_type=_JSON)


# --------------------------------------------------------------------------- config


@dataclass
class FakeConfig:
    """Behaviour of one fake backend.  Mutable at runtime (also via ``POST /_fake/config``)."""

    #: "ollama" or "openai" (llama.cpp-server-like, routes under /v1)
    kind: str = "ollama"
    #: advertised models; Ollama names without a tag match ":latest"
    models: list[str] = field(default_factory=lambda: ["llama3:latest"])
    #: models reported by /api/ps (Ollama kind)
    loaded: list[str] = field(default_factory=list)
    #: completion tokens per reply (one streamed chunk per token)
    tokens: int = 8
    #: seconds per generated token (slept only if > 0)
    delay: float = 0.0
    #: seconds before the response headers of generation routes (model loading)
    first_byte_delay: float = 0.0
    #: if set, every route but /_fake/* requires "Authorization: Bearer <key>"
    api_key: str | None = None
    version: str = "0.12.0"
    #: one of FAULTS, applied to generation routes only
    fault: str = "none"
    #: token chunks sent before a "die_midstream" / "stall" fault
    fault_after: int = 2
    #: stall length; also the first-byte delay of "slow_first_byte" when
    #: first_byte_delay is 0
    stall: float = 30.0
    #: if set, ``fault`` and ``first_byte_delay`` apply only to requests whose raw body
    #: contains this text (one client's bad request among good ones)
    fault_match: str = ""
    #: if > 0, a request arriving on a keep-alive connection idle for this many seconds
    #: finds it closed, unanswered (as when a server's idle timer, llama-server's ~5 s,
    #: fires just as the client reuses the connection); not counted as a request
    idle_close: float = 0.0
    #: top-level request fields refused with a 400 naming them, as servers that reject
    #: unknown parameters do (e.g. ``["stream_options"]``); OpenAI routes only
    reject_fields: list[str] = field(default_factory=list)
    #: bytes of filler ("." * pad) added to the text of each streamed Ollama token: a
    #: large streamed reply from few chunks (backpressure tests, the slow-reader benchmark)
    pad: int = 0
    #: context size in tokens (0: unlimited): a chat / generate prompt of more tokens (the
    #: prompt count above) is refused in the server's words (``flavor``), as real servers do
    n_ctx: int = 0
    #: False: a request with images is refused as by a model without vision (llama.cpp without
    #: its mmproj: 400 "image input is not supported"; Ollama: 500 "...missing data required
    #: for image input")
    vision: bool = True
    #: openai kind: serve POST /v1/rerank and /rerank (llama.cpp's ``--reranking``); without
    #: it they answer 501 as llama.cpp does
    reranking: bool = False
    #: openai kind: whose error wording to use: "llamacpp" or "vllm"
    flavor: str = "llamacpp"
    #: seconds of prefill per prompt token not in the prefix cache, slept before the first
    #: byte of a generation (0: no prefix cache, no prefill time)
    prefill: float = 0.0
    #: prompt prefixes the prefix cache holds (least recently used dropped first)
    prefix_cache: int = 64

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r} (expected one of {sorted(KINDS)})")
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r} (expected one of {sorted(FAULTS)})")

    def update(self, data: Mapping[str, Any]) -> None:
        """Merge ``data`` into this config (validated; unknown keys raise ``ValueError``)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        new: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                raise ValueError(f"unknown config key {key!r}")
            if key in ("models", "loaded", "reject_fields"):
                if isinstance(value, str):
                    value = [v for v in value.split(",") if v]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{key} must be a list of strings")
                value = list(value)
            elif key in ("vision", "reranking"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be a boolean")
            elif key in ("tokens", "fault_after", "pad", "n_ctx", "prefix_cache"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative int")
            elif key in ("delay", "first_byte_delay", "stall", "idle_close", "prefill"):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
                value = float(value)
            elif key == "api_key":
                if value is not None and not isinstance(value, str):
                    raise ValueError("api_key must be a string or null")
            elif not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
            new[key] = value
        if new.get("kind", self.kind) not in KINDS:
            raise ValueError(f"unknown kind {new['kind']!r}")
        if new.get("fault", self.fault) not in FAULTS:
            raise ValueError(f"unknown fault {new['fault']!r}")
        for key, value in new.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "models": list(self.models),
            "loaded": list(self.loaded),
            "tokens": self.tokens,
            "delay": self.delay,
            "first_byte_delay": self.first_byte_delay,
            "api_key": self.api_key,
            "version": self.version,
            "fault": self.fault,
            "fault_after": self.fault_after,
            "stall": self.stall,
            "fault_match": self.fault_match,
            "idle_close": self.idle_close,
            "reject_fields": list(self.reject_fields),
            "pad": self.pad,
            "n_ctx": self.n_ctx,
            "vision": self.vision,
            "reranking": self.reranking,
            "flavor": self.flavor,
            "prefill": self.prefill,
            "prefix_cache": self.prefix_cache,
        }


# --------------------------------------------------------------------------- stats


class FakeStats:
    """Counters of one fake backend.  All updates happen under ``threading.Lock``.

    Attributes may be read directly from another thread for simple lookups; use
    :meth:`snapshot` for a consistent deep copy.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.prompt_tokens_reported = 0
        self.completion_tokens_reported = 0
        self.completed = 0
        self.cancelled = 0
        self.faults = 0
        self.idle_closes = 0
        #: bytes of streamed replies handed to the connection so far (a gauge of progress:
        #: aiohttp's write waits while the peer is behind, so a throttled stream stalls it).
        #: Written only by the server's event loop, without the lock; read it from anywhere.
        self.bytes_streamed = 0
        self.last_request_bodies: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.auth_headers_seen: deque[str | None] = deque(maxlen=HISTORY)
        #: the prefix cache (with ``prefill`` > 0): generations looked up, those that found a
        #: cached prefix, their prompt tokens and the part of them found cached
        self.prefix = {"requests": 0, "hits": 0, "prompt_tokens": 0, "cached_tokens": 0}

    def reset(self) -> None:
        """Clear all counters.

        ``in_flight`` is a gauge of requests still running, so it is kept, and
        ``max_in_flight`` restarts from it.
        """
        with self._lock:
            self.requests = {}
            self.in_flight = {m: n for m, n in self.in_flight.items() if n > 0}
            self.max_in_flight = dict(self.in_flight)
            self.prompt_tokens_reported = 0
            self.completion_tokens_reported = 0
            self.completed = 0
            self.cancelled = 0
            self.faults = 0
            self.idle_closes = 0
            self.bytes_streamed = 0
            self.last_request_bodies = deque(maxlen=HISTORY)
            self.auth_headers_seen = deque(maxlen=HISTORY)
            self.prefix = dict.fromkeys(self.prefix, 0)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable copy of every counter."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "in_flight": dict(self.in_flight),
                "max_in_flight": dict(self.max_in_flight),
                "prompt_tokens_reported": self.prompt_tokens_reported,
                "completion_tokens_reported": self.completion_tokens_reported,
                "completed": self.completed,
                "cancelled": self.cancelled,
                "faults": self.faults,
                "idle_closes": self.idle_closes,
                "bytes_streamed": self.bytes_streamed,
                "last_request_bodies": list(self.last_request_bodies),
                "auth_headers_seen": list(self.auth_headers_seen),
                "prefix": dict(self.prefix),
            }

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def bodies_for(self, path: str) -> list[Any]:
        """Parsed JSON bodies recently received on ``path`` (oldest first)."""
        with self._lock:
            return [e["body"] for e in self.last_request_bodies if e["path"] == path]

    # -- recording (called from the server's event loop) --

    def note_request(self, path: str, auth: str | None) -> None:
        with self._lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            self.auth_headers_seen.append(auth)

    def note_body(self, path: str, body: Any) -> None:
        with self._lock:
            self.last_request_bodies.append({"path": path, "body": body})

    def enter(self, model: str) -> None:
        with self._lock:
            n = self.in_flight.get(model, 0) + 1
            self.in_flight[model] = n
            if n > self.max_in_flight.get(model, 0):
                self.max_in_flight[model] = n

    def leave(self, model: str) -> None:
        with self._lock:
            self.in_flight[model] = max(0, self.in_flight.get(model, 0) - 1)

    def complete(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.completed += 1
            self.prompt_tokens_reported += prompt_tokens
            self.completion_tokens_reported += completion_tokens

    def note_prefix(self, prompt_tokens: int, cached_tokens: int) -> None:
        with self._lock:
            p = self.prefix
            p["requests"] += 1
            p["hits"] += cached_tokens > 0
            p["prompt_tokens"] += prompt_tokens
            p["cached_tokens"] += cached_tokens

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def fault(self) -> None:
        with self._lock:
            self.faults += 1

    def idle_close(self) -> None:
        with self._lock:
            self.idle_closes += 1


# --------------------------------------------------------------------------- helpers


def _oa_usage(prompt_tokens: int, n: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def _oa_whole(
    cid: str, obj: str, created: int, name: str, choice: dict[str, Any], usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": name,
        "system_fingerprint": "fp_fake",
        "choices": [choice],
        "usage": usage,
    }


def _oa_head(cid: str, obj: str, created: int, name: str) -> bytes:
    """The start of every SSE event of one reply, up to its "choices"."""
    return (b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"system_fingerprint":"fp_fake",') % (
        cid.encode(),
        obj.encode(),
        created,
        _jb(name),
    )


def _oa_end(head: bytes, last_choice: bytes, usage: dict[str, int] | None) -> bytes:
    """The finishing event, the usage-only event when asked for, and [DONE]."""
    final = head + b'"choices":[' + last_choice + b"]}\n\n"
    if usage is not None:
        final += head + b'"choices":[],"usage":' + _jb(usage) + b"}\n\n"
    return final + b"data: [DONE]\n\n"


def _count_words(value: Any) -> int:
    """Whitespace-separated words in a prompt / message content (parts, token ids)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        text = value.get("text")
        return len(text.split()) if isinstance(text, str) else 0
    if isinstance(value, int) and not isinstance(value, bool):
        return 1  # a token id
    return 0


def _count_message_words(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(_count_words(m.get("content")) for m in messages if isinstance(m, dict))


def _limit(tokens: int, limit: Any) -> tuple[int, bool]:
    """``(n, truncated)``: tokens capped by a client limit (negative = unlimited)."""
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < tokens:
        return limit, True
    return tokens, False


@functools.lru_cache(maxsize=256)
def _content(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))


@functools.lru_cache(maxsize=16)
def _reasoning(n: int) -> str:
    return "".join(f"think{i} " for i in range(n))


@functools.lru_cache(maxsize=1024)
def _canonical(name: str) -> str:
    """Ollama model names default to the ``latest`` tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


@functools.lru_cache(maxsize=1024)
def _digest(name: str) -> str:
    return hashlib.sha256(_canonical(name).encode()).hexdigest()


def _size(name: str) -> int:
    return 1_000_000_000 + int(_digest(name)[:6], 16) * 1000


def _details(name: str) -> dict[str, Any]:
    family = name.split(":", 1)[0].rsplit("/", 1)[-1] or "llama"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "8.0B",
        "quantization_level": "Q4_K_M",
    }


@functools.lru_cache(maxsize=4096)
def _embedding(text: str) -> tuple[float, ...]:
    """Deterministic unit vector of 8 floats derived from the text."""
    raw = hashlib.sha256(text.encode()).digest()[:8]
    vals = [(b - 127.5) / 127.5 for b in raw]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return tuple(round(v / norm, 6) for v in vals)


def _embed_inputs(value: Any) -> list[str] | None:
    """Normalise an embedding input (str, list of str, token ids) to strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [json.dumps(value)]
        out: list[str] = []
        for v in value:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.append(json.dumps(v))
            else:
                return None
        return out
    return None


def _now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _tool_name(tools: Any) -> str | None:
    """Name of the first tool when tools are given, else None."""
    if not isinstance(tools, list) or not tools:
        return None
    first = tools[0]
    if isinstance(first, dict):
        fn = first.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return str(fn["name"])
        if isinstance(first.get("name"), str):
            return str(first["name"])
    return "tool"


def _wants_reasoning(body: dict[str, Any]) -> bool:
    effort = body.get("reasoning_effort")
    if effort is not None and effort != "none":
        return True
    think = body.get("think")
    return bool(think) and think != "none"


def _words(value: Any) -> list[str]:
    """The words of a prompt / message content (text parts of a list; token ids as words)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [w for v in value for w in _words(v)]
    if isinstance(value, dict):
        text = value.get("text")
        return text.split() if isinstance(text, str) else []
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    return []


def _message_words(messages: Any) -> list[str]:
    """A conversation as one word sequence: each message's role marker, then its words."""
    out: list[str] = []
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                out.append(f"<{m.get('role')}>")
                out += _words(m.get("content"))
    return out


class PrefixCache:
    """The prompt prefixes one server holds, as llama.cpp's and vLLM's prefix caches do.

    A prompt is a word sequence cut into blocks of BLOCK words, each block's hash chained to the
    one before (so a hash names the whole prefix up to it). An entry is the last full block of
    a prompt seen; a new prompt finds the longest of its own block prefixes that is an entry,
    and that many words are cached. The entry found is then replaced by the new prompt's (its
    slot now holds the longer conversation). At most `size` entries, least recently used out.
    Used from the server's event loop only."""

    BLOCK = 16

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, None] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    def lookup_and_store(self, words: list[str], size: int) -> int:
        """Words of `words` found cached (a multiple of BLOCK); `words` is cached from now on."""
        chain: list[bytes] = []
        h = b""
        block = self.BLOCK
        for i in range(0, len(words) - block + 1, block):
            h = hashlib.blake2b(h + " ".join(words[i : i + block]).encode(), digest_size=16).digest()
            chain.append(h)
        entries = self._entries
        cached = 0
        for j in range(len(chain) - 1, -1, -1):
            if chain[j] in entries:
                cached = (j + 1) * block
                del entries[chain[j]]
                break
        if chain:
            entries[chain[-1]] = None
            entries.move_to_end(chain[-1])
            while len(entries) > max(size, 0):
                entries.popitem(last=False)
        return cached


_Body = dict[str, Any]
_Handler = Callable[[web.BaseRequest, _Body], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------- server


class FakeBackend:
    """One fake backend server on 127.0.0.1 (see module docstring)."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config: FakeConfig = config if config is not None else FakeConfig()
        self.stats: FakeStats = FakeStats()
        self.prefix_cache = PrefixCache()
        self.port: int = 0
        self.url: str = ""
        self._runner: web.ServerRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # connection (transport) -> loop time its last request ended (for ``idle_close``)
        self._last_used: weakref.WeakKeyDictionary[asyncio.BaseTransport, float] = weakref.WeakKeyDictionary()
        common: dict[tuple[str, str], _Handler] = {
            ("GET", "/v1/models"): self._oa_models,
            ("POST", "/v1/chat/completions"): self._oa_chat,
            ("POST", "/v1/completions"): self._oa_completions,
            ("POST", "/v1/embeddings"): self._oa_embeddings,
        }
        rerank: dict[tuple[str, str], _Handler] = {
            ("POST", "/v1/rerank"): self._oa_rerank,
            ("POST", "/rerank"): self._oa_rerank,
        }
        self._routes: dict[str, dict[tuple[str, str], _Handler]] = {
            "ollama": {
                **common,
                ("GET", "/"): self._ol_root,
                ("HEAD", "/"): self._ol_root,
                ("GET", "/api/tags"): self._ol_tags,
                ("GET", "/api/ps"): self._ol_ps,
                ("GET", "/api/version"): self._ol_version,
                ("POST", "/api/show"): self._ol_show,
                ("POST", "/api/chat"): self._ol_chat,
                ("POST", "/api/generate"): self._ol_generate,
                ("POST", "/api/embed"): self._ol_embed,
                ("POST", "/api/embeddings"): self._ol_embeddings,
                ("POST", "/api/pull"): self._ol_pull,
                ("POST", "/api/push"): self._ol_push,
                ("POST", "/api/create"): self._ol_create,
                ("POST", "/api/copy"): self._ol_copy,
                ("DELETE", "/api/delete"): self._ol_delete,
            },
            "openai": {
                **common,
                ("GET", "/health"): self._oa_health,
                ("GET", "/v1/health"): self._oa_health,
                **rerank,
            },
        }
        self._paths: dict[str, frozenset[str]] = {
            kind: frozenset(p for _, p in routes) for kind, routes in self._routes.items()
        }

    # -- lifecycle --

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> None:
        """Start listening (``port=0`` picks a free port); sets ``port`` and ``url``."""
        if self._runner is not None:
            raise RuntimeError("already started")
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=2048)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        url_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self.url = f"http://{url_host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening and cancel requests still running (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for task in list(self._tasks):
            task.cancel()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- dispatch --

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_fake/"):
            return await self._control(request, path)
        if self.config.idle_close <= 0:
            return await self._dispatch(request, path)
        conn = request.transport
        if conn is None:
            return await self._dispatch(request, path)
        now = asyncio.get_running_loop().time()
        last = self._last_used.get(conn)
        if last is not None and now - last >= self.config.idle_close:
            self.stats.idle_close()
            self._last_used.pop(conn, None)
            await self._abort(request)
        try:
            return await self._dispatch(request, path)
        finally:
            self._last_used[conn] = asyncio.get_running_loop().time()

    async def _dispatch(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        cfg = self.config
        auth = request.headers.get("Authorization")
        self.stats.note_request(path, auth)
        if cfg.api_key is not None and auth != "Bearer " + cfg.api_key:
            return _json(
                401,
                {
                    "error": {
                        "message": "Invalid API key",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
        method = request.method
        handler = self._routes[cfg.kind].get((method, path))
        if handler is None:
            if path in self._paths[cfg.kind]:
                return self._error_for(path, 405, f"method {method} not allowed")
            if cfg.kind == "ollama" and not path.startswith("/v1/"):
                return web.Response(status=404, text="404 page not found")
            return self._oa_error(404, f"route {method} {path} not found", "not_found")
        body: _Body = {}
        if method in ("POST", "DELETE", "PUT"):
            raw = await request.content.read()
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    return self._error_for(path, 400, "invalid JSON body")
                if not isinstance(parsed, dict):
                    return self._error_for(path, 400, "JSON body must be an object")
                body = parsed
                self.stats.note_body(path, body)
                if cfg.fault_match:
                    request["fault_applies"] = cfg.fault_match.encode() in raw
                refused = [k for k in cfg.reject_fields if k in body] if path.startswith("/v1/") else []
                if refused:
                    return self._oa_error(400, f"Unrecognized request argument supplied: {refused[0]}")
        return await handler(request, body)

    def _prefill(self, request: web.BaseRequest, words: list[str], prompt_tokens: int) -> None:
        """With ``prefill`` > 0: look the prompt up in the prefix cache, count it, and set the
        request's prefill time (slept before its first byte, in ``_serve``)."""
        cfg = self.config
        if cfg.prefill <= 0:
            return
        cached = min(self.prefix_cache.lookup_and_store(words, cfg.prefix_cache), prompt_tokens)
        self.stats.note_prefix(prompt_tokens, cached)
        request["prefill"] = (prompt_tokens - cached) * cfg.prefill

    @staticmethod
    def _ol_error(status: int, message: str) -> web.Response:
        return _json(status, {"error": message})

    @staticmethod
    def _oa_error(
        status: int,
        message: str,
        code: str | int | None = None,
        type_: str = "invalid_request_error",
    ) -> web.Response:
        return _json(
            status,
            {"error": {"message": message, "type": type_, "param": None, "code": code}},
        )

    def _error_for(self, path: str, status: int, message: str) -> web.Response:
        if path.startswith("/v1/"):
            return self._oa_error(status, message)
        return self._ol_error(status, message)

    def _find_model(self, name: Any) -> str | None:
        if not isinstance(name, str) or not name:
            return None
        models = self.config.models
        if self.config.kind == "openai":
            return name if name in models else None
        canon = _canonical(name)
        for m in models:
            if m == name or _canonical(m) == canon:
                return m
        return None

    # -- control routes --

    async def _control(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        method = request.method
        if path == "/_fake/stats" and method == "GET":
            return _json(200, self.stats.snapshot())
        if path == "/_fake/reset" and method == "POST":
            self.stats.reset()
            self.prefix_cache.clear()
            return _json(200, {"ok": True})
        if path == "/_fake/config":
            if method == "GET":
                return _json(200, self.config.as_dict())
            if method == "POST":
                try:
                    data = await request.json()
                    if not isinstance(data, dict):
                        raise TypeError("config body must be a JSON object")
                    self.config.update(data)
                except (TypeError, ValueError) as exc:
                    return _json(400, {"error": str(exc)})
                return _json(200, self.config.as_dict())
        return _json(404, {"error": f"no control route {method} {path}"})

    # -- the generation engine (stats, delays, faults) --

    async def _serve_json(
        self,
        request: web.BaseRequest,
        model: str,
        reply: Any,
        *,
        prompt_tokens: int,
        openai_errors: bool,
    ) -> web.StreamResponse:
        """`_serve` for a whole JSON reply that generates nothing (embeddings, rerank, ...):
        one token delay, `prompt_tokens` reported, no completion tokens."""
        return await self._serve(
            request,
            model,
            content_type=_JSON,
            chunks=None,
            final=_jb(reply),
            steps=1,
            reported=(prompt_tokens, 0),
            openai_errors=openai_errors,
        )

    async def _serve(
        self,
        request: web.BaseRequest,
        model: str,
        *,
        content_type: str,
        chunks: Sequence[bytes] | None,
        final: bytes,
        steps: int,
        reported: tuple[int, int],
        openai_errors: bool,
    ) -> web.StreamResponse:
        """Send a generation reply, applying delays and faults.

        ``chunks`` are the streamed token chunks (``None`` = not streaming), then
        ``final`` is sent (the tail of a stream, or the whole non-streamed body).
        ``steps`` is how many token delays a non-streamed reply waits for, and
        ``reported`` the (prompt, completion) counts this reply contains.
        """
        cfg = self.config
        stats = self.stats
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        stats.enter(model)
        aborted = False
        completed = False
        try:
            applies = request.get("fault_applies", True)
            fault = cfg.fault if applies else "none"
            first_byte_delay = cfg.first_byte_delay if applies else 0.0
            if fault == "slow_first_byte" and first_byte_delay <= 0:
                first_byte_delay = cfg.stall
            first_byte_delay += request.get("prefill", 0.0)  # the uncached prompt (PrefixCache)
            if first_byte_delay > 0:
                await asyncio.sleep(first_byte_delay)
            if fault != "none" and fault != "slow_first_byte":
                stats.fault()
                if fault == "500" or fault == "503":
                    status = int(fault)
                    msg = (
                        "fake fault: internal server error"
                        if status == 500
                        else "server busy, please try again. maximum pending requests exceeded"
                    )
                    if openai_errors:
                        return self._oa_error(status, msg, status, "server_error")
                    return self._ol_error(status, msg)
                if fault == "reset":
                    aborted = True
                    await self._abort(request)
                if fault == "garbage":
                    return web.Response(body=_GARBAGE, headers={"Content-Type": content_type})
            delay = cfg.delay
            midstream = fault == "die_midstream" or fault == "stall"
            if chunks is None:
                if midstream:
                    if delay > 0:
                        await asyncio.sleep(delay * min(cfg.fault_after, steps))
                    if fault == "die_midstream":
                        aborted = True
                        await self._abort(request)
                    await asyncio.sleep(cfg.stall)
                    if delay > 0:
                        await asyncio.sleep(delay * max(0, steps - cfg.fault_after))
                elif delay > 0 and steps:
                    await asyncio.sleep(delay * steps)
                resp: web.StreamResponse = web.Response(body=final, headers={"Content-Type": content_type})
                # Counted before the reply leaves, so a client that reads the stats right
                # after its reply always finds it counted.
                stats.complete(*reported)
                completed = True
                await resp.prepare(request)
                await resp.write_eof()
            else:
                resp = web.StreamResponse(headers={"Content-Type": content_type})
                await resp.prepare(request)
                fault_at = cfg.fault_after if midstream else -1
                for i, chunk in enumerate(chunks):
                    if i == fault_at:
                        if fault == "die_midstream":
                            aborted = True
                            await self._abort(request)
                        await asyncio.sleep(cfg.stall)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await resp.write(chunk)
                    stats.bytes_streamed += len(chunk)
                if midstream and fault_at >= len(chunks):
                    if fault == "die_midstream":
                        aborted = True
                        await self._abort(request)
                    await asyncio.sleep(cfg.stall)
                stats.complete(*reported)  # before the final chunk leaves (see above)
                completed = True
                await resp.write(final)
                await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            if not aborted and not completed:
                stats.cancel()
            raise
        finally:
            stats.leave(model)
            if task is not None:
                self._tasks.discard(task)

    @staticmethod
    async def _abort(request: web.BaseRequest) -> None:
        """Abort the TCP connection; the handler is then cancelled by aiohttp."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        # connection_lost() cancels this handler on the next loop iteration
        # (handler_cancellation=True); the timeout is only a safety net.
        await asyncio.sleep(5)
        raise ConnectionResetError("fake backend aborted the connection")

    # -- ollama: metadata --

    async def _ol_root(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def _ol_version(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        return _json(200, {"version": self.config.version})

    async def _ol_tags(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        models = [
            {
                "name": m,
                "model": m,
                "modified_at": _MODIFIED_AT,
                "size": _size(m),
                "digest": _digest(m),
                "details": _details(m),
            }
            for m in list(self.config.models)
        ]
        return _json(200, {"models": models})

    async def _ol_ps(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        expires = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(time.time() + 300))
        models = [
            {
                "name": m,
                "model": m,
                "size": _size(m),
                "digest": _digest(m),
                "details": _details(m),
                "expires_at": expires,
                "size_vram": _size(m),
                "context_length": 4096,
            }
            for m in list(self.config.loaded)
        ]
        return _json(200, {"models": models})

    async def _ol_show(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        name = body.get("model") or body.get("name")
        model = self._find_model(name)
        if model is None:
            return self._ol_error(404, f"model '{name}' not found")
        details = _details(model)
        embedding = "embed" in model
        return _json(
            200,
            {
                "license": "",
                "modelfile": f"# fake modelfile\nFROM {model}\n",
                "parameters": "stop <|eot_id|>",
                "template": "{{ .Prompt }}",
                "details": details,
                "model_info": {
                    "general.architecture": details["family"],
                    "general.parameter_count": 8_000_000_000,
                    f"{details['family']}.context_length": 8192,
                    f"{details['family']}.embedding_length": 4096,
                },
                "capabilities": ["embedding"] if embedding else ["completion", "tools"],
                "modified_at": _MODIFIED_AT,
            },
        )

    # -- ollama: model management --

    def _add_model(self, name: str) -> None:
        if self._find_model(name) is None:
            self.config.models = [*self.config.models, _canonical(name)]

    async def _progress(
        self, request: web.BaseRequest, body: _Body, lines: list[dict[str, Any]]
    ) -> web.StreamResponse:
        if body.get("stream", True) is False:
            return _json(200, lines[-1])
        resp = web.StreamResponse(headers={"Content-Type": _NDJSON})
        await resp.prepare(request)
        for line in lines:
            await resp.write(_jb(line) + b"\n")
        await resp.write_eof()
        return resp

    @staticmethod
    def _transfer_lines(name: str, first: str, verb: str) -> list[dict[str, Any]]:
        digest = "sha256:" + _digest(name)
        return [
            {"status": first},
            *(
                {"status": verb, "digest": digest, "total": 3000, "completed": done}
                for done in (1000, 2000, 3000)
            ),
            {"status": "success"},
        ]

    async def _ol_pull(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return self._ol_error(400, "model is required")
        lines = self._transfer_lines(name, "pulling manifest", "downloading")
        self._add_model(name)
        return await self._progress(request, body, lines)

    async def _ol_push(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        name = body.get("model") or body.get("name")
        if self._find_model(name) is None:
            return self._ol_error(404, f"model '{name}' not found")
        assert isinstance(name, str)
        lines = self._transfer_lines(name, "retrieving manifest", "pushing")
        return await self._progress(request, body, lines)

    async def _ol_create(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return self._ol_error(400, "model is required")
        self._add_model(name)
        return await self._progress(request, body, [{"status": "success"}])

    async def _ol_copy(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        source, destination = body.get("source"), body.get("destination")
        if self._find_model(source) is None:
            return self._ol_error(404, f"model '{source}' not found")
        if not isinstance(destination, str) or not destination:
            return self._ol_error(400, "destination is required")
        self._add_model(destination)
        return web.Response(status=200)

    async def _ol_delete(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        name = body.get("model") or body.get("name")
        model = self._find_model(name)
        if model is None:
            return self._ol_error(404, f"model '{name}' not found")
        cfg = self.config
        cfg.models = [m for m in cfg.models if m != model]
        cfg.loaded = [m for m in cfg.loaded if _canonical(m) != _canonical(model)]
        return web.Response(status=200)

    # -- ollama: generation --

    def _ol_counts(self, prompt_tokens: int, n: int) -> dict[str, int]:
        cfg = self.config
        load = int(cfg.first_byte_delay * 1e9) + 1_000_000
        prompt_dur = prompt_tokens * 100_000 + 1
        eval_dur = n * max(int(cfg.delay * 1e9), 1_000_000) + 1
        return {
            "total_duration": load + prompt_dur + eval_dur,
            "load_duration": load,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt_dur,
            "eval_count": n,
            "eval_duration": eval_dur,
        }

    def _ol_check_model(self, body: _Body) -> tuple[str, str] | web.Response:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return self._ol_error(400, "model is required")
        model = self._find_model(name)
        if model is None:
            return self._ol_error(404, f"model '{name}' not found")
        return name, model

    async def _ol_load(
        self, request: web.BaseRequest, body: _Body, name: str, model: str, field_: str
    ) -> web.StreamResponse:
        """Empty prompt: Ollama (un)loads the model and answers at once."""
        cfg = self.config
        unload = body.get("keep_alive") in (0, "0", "0s", "0m")
        canon = _canonical(model)
        others = [m for m in cfg.loaded if _canonical(m) != canon]
        cfg.loaded = others if unload else [*others, model]
        reply: dict[str, Any] = {"model": name, "created_at": _now_rfc3339()}
        if field_ == "message":
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        reply["done_reason"] = "unload" if unload else "load"
        reply["done"] = True
        self.stats.complete(0, 0)
        data = _jb(reply)
        if body.get("stream", True) is False:
            return web.Response(body=data, content_type=_JSON)
        return web.Response(body=data + b"\n", headers={"Content-Type": _NDJSON})

    async def _ol_chat(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        return await self._ol_generation(request, body, chat=True)

    async def _ol_generate(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        return await self._ol_generation(request, body, chat=False)

    async def _ol_generation(
        self, request: web.BaseRequest, body: _Body, *, chat: bool
    ) -> web.StreamResponse:
        checked = self._ol_check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, model = checked
        if chat:
            messages = body.get("messages")
            if not messages:
                return await self._ol_load(request, body, name, model, "message")
            prompt_tokens = _count_message_words(messages) + 1
            tool = _tool_name(body.get("tools"))
            if self.config.prefill > 0:
                self._prefill(request, _message_words(messages), prompt_tokens)
        else:
            prompt = body.get("prompt")
            if not prompt:
                return await self._ol_load(request, body, name, model, "response")
            prompt_tokens = _count_words(prompt) + 1
            tool = None
            if self.config.prefill > 0:
                self._prefill(request, _words(body.get("system")) + _words(prompt), prompt_tokens)
        refused = self._refusal(body, prompt_tokens, openai=False)
        if refused is not None:
            return refused
        options = body.get("options")
        limit = options.get("num_predict") if isinstance(options, dict) else None
        n, truncated = _limit(self.config.tokens, limit)
        think = REASONING_CHUNKS if _wants_reasoning(body) else 0
        stream = body.get("stream", True) is not False
        counts = self._ol_counts(prompt_tokens, n)
        done_reason = "length" if truncated else "stop"
        created = _now_rfc3339()
        if not stream:
            reply: dict[str, Any] = {"model": name, "created_at": created}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": ""}
                if think:
                    message["thinking"] = _reasoning(think)
                if tool is not None:
                    message["tool_calls"] = [{"function": {"name": tool, "arguments": _TOOL_ARGS}}]
                else:
                    message["content"] = _content(n)
                reply["message"] = message
            else:
                reply["response"] = _content(n)
                if think:
                    reply["thinking"] = _reasoning(think)
            reply["done"] = True
            reply["done_reason"] = done_reason
            reply.update(counts)
            if not chat:
                reply["context"] = list(range(1, min(prompt_tokens + n, 32) + 1))
            return await self._serve(
                request,
                model,
                content_type=_JSON,
                chunks=None,
                final=_jb(reply),
                steps=think + (1 if tool is not None else n),
                reported=(prompt_tokens, n),
                openai_errors=False,
            )
        head = b'{"model":' + _jb(name) + b',"created_at":"' + created.encode() + b'",'
        chunks: list[bytes] = []
        if chat:
            for i in range(think):
                chunks.append(
                    head + b'"message":{"role":"assistant","content":"","thinking":"think%d "},'
                    b'"done":false}\n' % i
                )
            if tool is not None:
                calls = _jb([{"function": {"name": tool, "arguments": _TOOL_ARGS}}])
                chunks.append(
                    head
                    + b'"message":{"role":"assistant","content":"","tool_calls":'
                    + calls
                    + b'},"done":false}\n'
                )
            else:
                filler = b"." * self.config.pad
                for i in range(n):
                    chunks.append(
                        head
                        + b'"message":{"role":"assistant","content":"tok%d %s"},"done":false}\n' % (i, filler)
                    )
            last: dict[str, Any] = {"message": {"role": "assistant", "content": ""}}
        else:
            for i in range(think):
                chunks.append(head + b'"response":"","thinking":"think%d ","done":false}\n' % i)
            filler = b"." * self.config.pad
            for i in range(n):
                chunks.append(head + b'"response":"tok%d %s","done":false}\n' % (i, filler))
            last = {"response": ""}
        last["done"] = True
        last["done_reason"] = done_reason
        last.update(counts)
        if not chat:
            last["context"] = list(range(1, min(prompt_tokens + n, 32) + 1))
        final = head + _jb(last)[1:] + b"\n"
        return await self._serve(
            request,
            model,
            content_type=_NDJSON,
            chunks=chunks,
            final=final,
            steps=len(chunks),
            reported=(prompt_tokens, n),
            openai_errors=False,
        )

    async def _ol_embed(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        checked = self._ol_check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, model = checked
        inputs = _embed_inputs(body.get("input", ""))
        if inputs is None:
            return self._ol_error(400, "invalid input type")
        words = sum(_count_words(s) for s in inputs)
        counts = self._ol_counts(words, 0)
        reply = {
            "model": name,
            "embeddings": [_embedding(s) for s in inputs],
            "total_duration": counts["total_duration"],
            "load_duration": counts["load_duration"],
            "prompt_eval_count": words,
        }
        return await self._serve_json(request, model, reply, prompt_tokens=words, openai_errors=False)

    async def _ol_embeddings(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        checked = self._ol_check_model(body)
        if isinstance(checked, web.Response):
            return checked
        _, model = checked
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else ""
        reply = {"embedding": _embedding(text) if text else []}
        return await self._serve_json(request, model, reply, prompt_tokens=0, openai_errors=False)

    # -- OpenAI-compatible (llama.cpp server, or Ollama's /v1) --

    async def _oa_health(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        return _json(200, {"status": "ok"})

    async def _oa_models(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        owner = "library" if self.config.kind == "ollama" else "llamacpp"
        data = [
            {"id": m, "object": "model", "created": _CREATED, "owned_by": owner}
            for m in list(self.config.models)
        ]
        return _json(200, {"object": "list", "data": data})

    def _oa_check_model(self, body: _Body) -> tuple[str, str] | web.Response:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return self._oa_error(400, "you must provide a model parameter", "model_required")
        model = self._find_model(name)
        if model is None:
            return self._oa_error(404, f"The model `{name}` does not exist", "model_not_found")
        return name, model

    @staticmethod
    def _oa_limit(tokens: int, body: _Body) -> tuple[int, bool]:
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        return _limit(tokens, limit)

    @staticmethod
    def _include_usage(body: _Body) -> bool:
        opts = body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage") is True

    async def _oa_serve(
        self,
        request: web.BaseRequest,
        model: str,
        chunks: list[bytes] | None,
        final: bytes | dict[str, Any],
        steps: int,
        usage: dict[str, int] | None,
    ) -> web.StreamResponse:
        """A whole reply (chunks None, final the JSON object) or an SSE stream; `usage` is
        what the reply reports (None: a stream without the usage chunk reports nothing)."""
        reported = (usage["prompt_tokens"], usage["completion_tokens"]) if usage else (0, 0)
        return await self._serve(
            request,
            model,
            content_type=_JSON if chunks is None else _SSE,
            chunks=chunks,
            final=final if isinstance(final, bytes) else _jb(final),
            steps=steps,
            reported=reported,
            openai_errors=True,
        )

    async def _oa_chat(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        checked = self._oa_check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, model = checked
        prompt_tokens = _count_message_words(body.get("messages")) + 1
        refused = self._refusal(body, prompt_tokens, openai=True)
        if refused is not None:
            return refused
        if self.config.prefill > 0:
            self._prefill(request, _message_words(body.get("messages")), prompt_tokens)
        n, truncated = self._oa_limit(self.config.tokens, body)
        tool = None if body.get("tool_choice") == "none" else _tool_name(body.get("tools"))
        think = REASONING_CHUNKS if _wants_reasoning(body) else 0
        finish = "tool_calls" if tool is not None else ("length" if truncated else "stop")
        usage = _oa_usage(prompt_tokens, n)
        cid = f"chatcmpl-{next(_ids)}"
        created = int(time.time())
        call_id = f"call_{cid[9:]}"
        if body.get("stream") is not True:
            message: dict[str, Any] = {"role": "assistant", "content": _content(n)}
            if think:
                message["reasoning_content"] = _reasoning(think)
            if tool is not None:
                message["content"] = None
                message["tool_calls"] = [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool, "arguments": _TOOL_ARGS_STR},
                    }
                ]
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            reply = _oa_whole(cid, "chat.completion", created, name, choice, usage)
            steps = think + (2 if tool is not None else n)
            return await self._oa_serve(request, model, None, reply, steps, usage)
        head = _oa_head(cid, "chat.completion.chunk", created, name)
        open_delta = head + b'"choices":[{"index":0,"delta":{'
        close = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        role = b'"role":"assistant",'
        chunks: list[bytes] = []
        for i in range(think):
            chunks.append(
                open_delta
                + (role if not chunks else b"")
                + b'"content":null,"reasoning_content":"think%d "' % i
                + close
            )
        if tool is not None:
            start = {
                "index": 0,
                "id": call_id,
                "type": "function",
                "function": {"name": tool, "arguments": ""},
            }
            args = {"index": 0, "function": {"arguments": _TOOL_ARGS_STR}}
            chunks.append(
                open_delta
                + (role if not chunks else b"")
                + b'"content":null,"tool_calls":'
                + _jb([start])
                + close
            )
            chunks.append(open_delta + b'"tool_calls":' + _jb([args]) + close)
        else:
            for i in range(n):
                chunks.append(open_delta + (role if not chunks else b"") + b'"content":"tok%d "' % i + close)
        last = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}' % finish.encode()
        reported = usage if self._include_usage(body) else None
        final = _oa_end(head, last, reported)
        return await self._oa_serve(request, model, chunks, final, len(chunks), reported)

    async def _oa_completions(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        checked = self._oa_check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, model = checked
        prompt_tokens = _count_words(body.get("prompt")) + 1
        if self.config.prefill > 0:
            self._prefill(request, _words(body.get("prompt")), prompt_tokens)
        n, truncated = self._oa_limit(self.config.tokens, body)
        finish = "length" if truncated else "stop"
        usage = _oa_usage(prompt_tokens, n)
        cid = f"cmpl-{next(_ids)}"
        created = int(time.time())
        if body.get("stream") is not True:
            choice = {"text": _content(n), "index": 0, "logprobs": None, "finish_reason": finish}
            reply = _oa_whole(cid, "text_completion", created, name, choice, usage)
            return await self._oa_serve(request, model, None, reply, n, usage)
        head = _oa_head(cid, "text_completion", created, name)
        chunks = [
            head + b'"choices":[{"text":"tok%d ","index":0,"logprobs":null,"finish_reason":null}]}\n\n' % i
            for i in range(n)
        ]
        last = b'{"text":"","index":0,"logprobs":null,"finish_reason":"%s"}' % finish.encode()
        reported = usage if self._include_usage(body) else None
        final = _oa_end(head, last, reported)
        return await self._oa_serve(request, model, chunks, final, n, reported)

    async def _oa_embeddings(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        checked = self._oa_check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, model = checked
        inputs = _embed_inputs(body.get("input"))
        if inputs is None:
            return self._oa_error(400, "'input' must be a string or an array", "invalid_input")
        b64 = body.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        for i, text in enumerate(inputs):
            vec = _embedding(text)
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "embedding": emb, "index": i})
        words = sum(_count_words(s) for s in inputs)
        reply = {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
        return await self._serve_json(request, model, reply, prompt_tokens=words, openai_errors=True)

    # -- context size, vision and rerank (the router's recovery and rerank routes) --

    def _refusal(self, body: _Body, prompt_tokens: int, *, openai: bool) -> web.Response | None:
        """The server's refusal of a prompt longer than ``n_ctx`` or of images without
        ``vision``, in its own words; None when it serves the request."""
        cfg = self.config
        if not cfg.vision and _has_images(body):
            if openai:
                return self._oa_error(
                    400,
                    "image input is not supported - hint: if this is unexpected, "
                    "you may need to provide the mmproj",
                    400,
                )
            return self._ol_error(
                500,
                "Failed to create new sequence: failed to process inputs: "
                "this model is missing data required for image input",
            )
        if cfg.n_ctx <= 0 or prompt_tokens <= cfg.n_ctx:
            return None
        if not openai:
            return self._ol_error(400, "the input length exceeds the context length")
        if cfg.flavor == "vllm":
            return self._oa_error(
                400,
                f"This model's maximum context length is {cfg.n_ctx} tokens. However, you requested "
                f"{prompt_tokens + cfg.tokens} tokens ({prompt_tokens} in the messages, {cfg.tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                type_="BadRequestError",
            )
        error = {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": prompt_tokens,
            "n_ctx": cfg.n_ctx,
        }
        return _json(400, {"error": error})

    async def _oa_rerank(self, request: web.BaseRequest, body: _Body) -> web.StreamResponse:
        """llama.cpp's rerank: results in the documents' order (as older llama.cpp servers
        answer; callers sort), score = the share of the query's words found in the document."""
        if not self.config.reranking:
            return self._oa_error(
                501,
                "This server does not support reranking. Start it with `--reranking`",
                501,
                "not_supported_error",
            )
        checked = self._oa_check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, model = checked
        query, documents = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list) or not documents:
            return self._oa_error(400, '"query" and "documents" must be provided', 400)
        if not all(isinstance(d, str) for d in documents):
            return self._oa_error(400, '"documents" must be an array of strings', 400)
        words = set(query.lower().split())
        results = [
            {
                "index": i,
                "relevance_score": len(words & set(doc.lower().split())) / max(1, len(words)),
            }
            for i, doc in enumerate(documents)
        ]
        tokens = sum(_count_words(query) + _count_words(doc) + 2 for doc in documents)
        reply = {
            "model": name,
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }
        return await self._serve_json(request, model, reply, prompt_tokens=tokens, openai_errors=True)


def _has_images(body: _Body) -> bool:
    """Images in an Ollama body (``images``) or an OpenAI one (``image_url`` parts)."""
    if body.get("images"):
        return True
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        if message.get("images"):
            return True
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") == "image_url" for p in content
        ):
            return True
    return False


# --------------------------------------------------------------------------- threads


class ThreadedFake:
    """A :class:`FakeBackend` running on its own event loop in a daemon thread."""

    def __init__(self, config: FakeConfig, port: int = 0, host: str = "127.0.0.1") -> None:
        self.backend = FakeBackend(config)
        self._port_wanted = port
        self._host = host
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"fake-backend-{config.kind}", daemon=True)

    @property
    def config(self) -> FakeConfig:
        return self.backend.config

    @property
    def stats(self) -> FakeStats:
        return self.backend.stats

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def port(self) -> int:
        return self.backend.port

    def start(self, timeout: float = 10.0) -> ThreadedFake:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("fake backend did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        # gather(return_exceptions=True) hands a startup error (e.g. port in
        # use) back as a value, to be re-raised in the thread that called start().
        (outcome,) = loop.run_until_complete(
            asyncio.gather(
                self.backend.start(self._port_wanted, self._host),
                return_exceptions=True,
            )
        )
        if isinstance(outcome, BaseException):
            self._error = outcome
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and the thread (idempotent)."""
        if self._stopped or self._error is not None or not self._thread.is_alive():
            self._stopped = True
            return
        self._stopped = True
        future = asyncio.run_coroutine_threadsafe(self.backend.stop(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_in_thread(config: FakeConfig, port: int = 0, host: str = "127.0.0.1") -> ThreadedFake:
    """Start a fake backend in a daemon thread and return it once it listens."""
    return ThreadedFake(config, port, host).start()


# --------------------------------------------------------------------------- CLI


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fake_backend",
        description="Fake Ollama / OpenAI LLM backend.",
    )
    p.add_argument("--kind", choices=sorted(KINDS), default="ollama")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--models", type=_split, default=None, help="comma-separated model names")
    p.add_argument("--loaded", type=_split, default=None, help="comma-separated loaded models")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--first-byte-delay", type=float, default=0.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--version", default="0.12.0")
    p.add_argument("--fault", choices=sorted(FAULTS), default="none")
    p.add_argument("--fault-after", type=int, default=2)
    p.add_argument("--stall", type=float, default=30.0)
    p.add_argument("--pad", type=int, default=0, help="filler bytes per streamed Ollama token")
    p.add_argument("--prefill", type=float, default=0.0, help="seconds per uncached prompt token")
    p.add_argument("--prefix-cache", type=int, default=64, help="prompt prefixes cached")
    return p.parse_args(argv)


async def _serve_forever(config: FakeConfig, host: str, port: int) -> None:
    backend = FakeBackend(config)
    await backend.start(port, host)
    print(f"listening on {backend.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await backend.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    config = FakeConfig(
        kind=args.kind,
        tokens=args.tokens,
        delay=args.delay,
        first_byte_delay=args.first_byte_delay,
        api_key=args.api_key,
        version=args.version,
        fault=args.fault,
        fault_after=args.fault_after,
        stall=args.stall,
        pad=args.pad,
        prefill=args.prefill,
        prefix_cache=args.prefix_cache,
    )
    if args.models is not None:
        config.models = args.models
    if args.loaded is not None:
        config.loaded = args.loaded
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
