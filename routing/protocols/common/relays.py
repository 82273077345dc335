"""How a reply is passed to the client and where its token counts are found.

A relay sees each upstream chunk, returns what the client gets, and knows at the end
whether the reply completed and with which counts. Pass-through relays return chunks
unchanged; translating relays (routing/protocols/translate.py) rewrite them.
"""

from __future__ import annotations

import json
from typing import Any

from routing.engine.accounting import Counts
from routing.protocols.common.streams import NdjsonScanner, SseScanner, ollama_counts, openai_counts


class OllamaStream:
    content_type = "application/x-ndjson"

    def __init__(self) -> None:
        self._scanner = NdjsonScanner()
        self._final: Any = None

    def feed(self, chunk: bytes) -> bytes:
        return self._scanner.feed(chunk)

    def finish(self) -> bytes:
        self._final = self._scanner.final()
        return b""

    def counts(self) -> Counts | None:
        return ollama_counts(self._final)

    def error_chunk(self, message: str) -> bytes:
        return json.dumps({"error": message}).encode() + b"\n"


class OpenAIStream:
    content_type = "text/event-stream"

    def __init__(self, *, strip_usage: bool) -> None:
        self._scanner = SseScanner(strip_usage=strip_usage)

    def feed(self, chunk: bytes) -> bytes:
        return self._scanner.feed(chunk)

    def finish(self) -> bytes:
        return self._scanner.flush()

    def counts(self) -> Counts | None:
        return self._scanner.usage

    def error_chunk(self, message: str) -> bytes:
        err = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return b"data: " + json.dumps(err).encode() + b"\n\n"


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def ollama_body(body: bytes) -> tuple[bytes, Counts | None]:
    return body, ollama_counts(_loads(body))


def openai_body(body: bytes) -> tuple[bytes, Counts | None]:
    return body, openai_counts(_loads(body))


def no_counts(body: bytes) -> tuple[bytes, Counts | None]:
    return body, None
