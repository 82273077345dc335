"""A scripted OpenAI-compatible server for translation tests, on a loopback port.

Unlike bench/fake_backend.py (fixed, fast replies), each test says exactly what this one
answers: the SSE events of a stream (sent one write per event, or several per write) or
the whole JSON reply. Every request body is recorded, so a test can check what the router
sent upstream.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Script = Callable[[str, dict[str, Any]], "Reply"]


@dataclass
class Reply:
    """`events` (SSE data payloads) for a stream, `whole` for a JSON reply."""

    events: list[Any] | None = None
    whole: Any = None
    per_write: int = 1  # events per socket write


def usage(prompt: int = 3, completion: int = 2) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(prompt: int = 3, completion: int = 2) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": usage(prompt, completion),
    }


@dataclass
class ScriptedServer:
    models: list[str]
    script: Script
    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def paths(self) -> list[str]:
        return [path for path, _ in self.bodies]

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append((request.path, body))
        reply = self.script(request.path, body)
        if reply.events is None:
            return web.json_response(reply.whole)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        payloads = [*(json.dumps(e) for e in reply.events), "[DONE]"]
        for start in range(0, len(payloads), reply.per_write):
            group = payloads[start : start + reply.per_write]
            await response.write(b"".join(f"data: {p}\n\n".encode() for p in group))
        await response.write_eof()
        return response

    def start(self) -> ScriptedServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._generate)
            app.router.add_post("/v1/completions", self._generate)
            app.router.add_post("/v1/embeddings", self._generate)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
