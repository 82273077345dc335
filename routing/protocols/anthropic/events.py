"""Streamed replies as Anthropic's server-sent events, from OpenAI SSE and from Ollama NDJSON.

Event sequence (Anthropic's reference, Streaming Messages): `message_start` (the message with
empty content; its usage is zero, as neither server kind reports the prompt's count before
the end), `ping`, then per content block `content_block_start`, `content_block_delta`s
(`thinking_delta`, `text_delta`, `input_json_delta`), `content_block_stop`; then
`message_delta` (stop_reason, stop_sequence, usage with the server's input and output
counts) and `message_stop`. Each event is `event: <type>` and `data: <json>`.

Invariants:
- blocks are indexed in the order they open, from 0; one block is open at a time: a kind
  change (thinking -> text, text -> a tool call, one tool call -> the next) closes the open
  block first, so thinking comes before the text it preceded and each tool call is its own
  block; a late argument delta for an earlier call (no known server interleaves them) is
  still sent, at that call's index;
- the ending (`message_delta`, `message_stop`) is sent once, when the server said it finished
  (OpenAI `[DONE]` or a finish_reason with the stream's end; Ollama `done: true`); a stream
  that ends without it gets an `error` event instead, nothing invented;
- an upstream failure mid-stream is an `event: error` with Anthropic's error object.
"""

from __future__ import annotations

import json
from typing import Any

from routing.core.errors import anthropic_error
from routing.engine.accounting import Counts
from routing.protocols.anthropic.replies import arguments, message_id, stop_reason, text, tool_id, usage
from routing.protocols.common.streams import ollama_counts, openai_counts

MAX_PENDING = 32 * 1024 * 1024


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


_DELTA = (
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": %d, '
    b'"delta": {"type": "%s", "%s": %s}}\n\n'
)


def error_event(message: str, kind: int = 502) -> bytes:
    """An `event: error` carrying the error object of status `kind` (502: api_error)."""
    return event("error", anthropic_error(kind, message))


class Writer:
    """Builds one message's event stream (see the module's invariants). Each method returns the
    bytes to send."""

    def __init__(self, model: str, *, keep_thinking: bool) -> None:
        self.model = model
        self.keep_thinking = keep_thinking
        self.started = False
        self.ended = False
        self._open: str | None = None  # "thinking", "text", or "tool:<key>" of the open block
        self._next = 0
        self._tools: dict[str, int] = {}  # tool key -> its block index
        self.tool_calls = 0

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        head: dict[str, Any] = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(None),
        }
        return event("message_start", {"type": "message_start", "message": head}) + event(
            "ping", {"type": "ping"}
        )

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return event("content_block_stop", {"type": "content_block_stop", "index": self._next - 1})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._open = kind
        out += event(
            "content_block_start",
            {"type": "content_block_start", "index": self._next, "content_block": block},
        )
        self._next += 1
        return out

    @staticmethod
    def _delta(index: int, kind: bytes, field: bytes, value: str) -> bytes:
        """One content_block_delta, from a template: only the value is JSON-encoded (one per
        token: the hot path of a streamed reply)."""
        return _DELTA % (index, kind, field, json.dumps(value).encode())

    def thinking(self, chunk: str) -> bytes:
        if not chunk or not self.keep_thinking:
            return b""
        out = self.start() if not self.started else b""
        if self._open != "thinking":
            out += self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return out + self._delta(self._next - 1, b"thinking_delta", b"thinking", chunk)

    def text(self, chunk: str) -> bytes:
        if not chunk:
            return b""
        out = self.start() if not self.started else b""
        if self._open != "text":
            out += self._open_block("text", {"type": "text", "text": ""})
        return out + self._delta(self._next - 1, b"text_delta", b"text", chunk)

    def tool(self, key: str, call_id: str, name: str) -> bytes:
        """Open the block of tool call `key` (the server's index or id)."""
        out = self.start()
        self.tool_calls += 1
        out += self._open_block(f"tool:{key}", {"type": "tool_use", "id": call_id, "name": name, "input": {}})
        self._tools[key] = self._next - 1
        return out

    def has_tool(self, key: str) -> bool:
        return key in self._tools

    def tool_input(self, key: str, partial: str) -> bytes:
        if not partial or key not in self._tools:
            return b""
        return self._delta(self._tools[key], b"input_json_delta", b"partial_json", partial)

    def error(self, message: str) -> bytes:
        """The stream's `error` event, which ends it; nothing once it has ended."""
        if self.ended:
            return b""
        self.ended = True
        return self.start() + error_event(message)

    def end(self, reason: tuple[str, str | None], counts: Counts | None) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        out = self.start() + self._close()
        delta = {"type": "message_delta", "delta": {"stop_reason": reason[0], "stop_sequence": reason[1]}}
        delta["usage"] = usage(counts)
        return out + event("message_delta", delta) + event("message_stop", {"type": "message_stop"})


class _Lines:
    """Complete records of a byte stream split on `sep` (the last, partial one is kept)."""

    def __init__(self, sep: bytes) -> None:
        self.sep = sep
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self.pending + chunk if self.pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        cut = data.rfind(self.sep)
        if cut < 0:
            self.pending = data if len(data) < MAX_PENDING else b""
            return []
        self.pending = data[cut + len(self.sep) :]
        return [record for record in data[:cut].split(self.sep) if record.strip()]

    def rest(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


class FromOpenAI:
    """OpenAI chat-completion SSE chunks in, Anthropic events out (a `Relay`)."""

    content_type = "text/event-stream"

    def __init__(self, model: str, stops: list[str], *, keep_thinking: bool) -> None:
        self.writer = Writer(model, keep_thinking=keep_thinking)
        self.stops = stops
        self._lines = _Lines(b"\n\n")
        self._usage: Counts | None = None
        self._finish: Any = None
        self._matched: Any = None
        self._done = False
        self._last_tool = ""
        self._waiting: dict[str, list[str]] = {}  # tool key -> [id, name, arguments] until its name comes

    def feed(self, chunk: bytes) -> bytes:
        out = [self.writer.start()]
        for record in self._lines.feed(chunk):
            if self.writer.ended:
                break  # after the ending or an error: nothing more reaches the client
            out.append(self._record(record))
        return b"".join(out)

    def _record(self, record: bytes) -> bytes:
        payload = b"".join(line[5:].strip() for line in record.split(b"\n") if line.startswith(b"data:"))
        if not payload:
            return b""
        if payload == b"[DONE]":
            self._done = True
            return self._end()
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return b""
        return self._chunk(obj) if isinstance(obj, dict) else b""

    def _chunk(self, obj: dict[str, Any]) -> bytes:
        if "usage" in obj:
            counts = openai_counts(obj)
            if counts is not None:
                self._usage = counts
        if "error" in obj and isinstance(obj["error"], dict):  # an error event some servers send mid-stream
            return self.writer.error(text(obj["error"].get("message")) or "upstream error")
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return b""
        choice = choices[0]
        out = b""
        delta = choice.get("delta")
        if delta and isinstance(delta, dict):
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if thinking:
                out += self.writer.thinking(text(thinking))
            content = delta.get("content")
            if content:
                out += self.writer.text(text(content))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    out += self._tool_delta(call)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
            self._matched = choice.get("stop_reason")
        return out

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        index = call.get("index")
        cid = text(call.get("id"))
        key = (
            str(index) if isinstance(index, int) and not isinstance(index, bool) else (cid or self._last_tool)
        )
        self._last_tool = key
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        name, args = text(fn.get("name")), fn.get("arguments")
        partial = args if isinstance(args, str) else (json.dumps(args) if isinstance(args, dict) else "")
        if self.writer.has_tool(key):
            return self.writer.tool_input(key, partial)
        waiting = self._waiting.setdefault(key, ["", "", ""])
        waiting[0] = waiting[0] or cid
        waiting[1] += name
        waiting[2] += partial
        if not waiting[1]:
            return b""  # the block opens once its name is known
        del self._waiting[key]
        return self.writer.tool(key, waiting[0] or tool_id(), waiting[1]) + self.writer.tool_input(
            key, waiting[2]
        )

    def _end(self) -> bytes:
        out = b"".join(
            self.writer.tool(key, w[0] or tool_id(), w[1] or "tool") + self.writer.tool_input(key, w[2])
            for key, w in self._waiting.items()
        )
        self._waiting.clear()
        reason = stop_reason(
            self._finish, tools=self.writer.tool_calls > 0, matched=self._matched, stops=self.stops
        )
        return out + self.writer.end(reason, self._usage)

    def finish(self) -> bytes:
        out = b""
        rest = self._lines.rest()
        if rest.strip():
            out = self._record(rest)
        if self.writer.ended:
            return out
        if self._finish is None and self._usage is None:
            return out + self.error_chunk("the server ended its reply before finishing it")
        return out + self._end()

    def counts(self) -> Counts | None:
        return self._usage

    def error_chunk(self, message: str) -> bytes:
        return self.writer.error(message)


class FromOllama:
    """Ollama /api/chat NDJSON chunks in, Anthropic events out (a `Relay`)."""

    content_type = "text/event-stream"

    def __init__(self, model: str, *, keep_thinking: bool) -> None:
        self.writer = Writer(model, keep_thinking=keep_thinking)
        self._lines = _Lines(b"\n")
        self._final: Any = None
        self._tools = 0

    def feed(self, chunk: bytes) -> bytes:
        out = [self.writer.start()]
        for line in self._lines.feed(chunk):
            if self.writer.ended:
                break  # after the ending or an error: nothing more reaches the client
            out.append(self._line(line))
        return b"".join(out)

    def _line(self, line: bytes) -> bytes:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return b""
        if not isinstance(obj, dict):
            return b""
        if isinstance(obj.get("error"), str):
            return self.writer.error(obj["error"])
        out: list[bytes] = []
        said = obj.get("message")
        if isinstance(said, dict):
            if said.get("thinking"):
                out.append(self.writer.thinking(text(said["thinking"])))
            if said.get("content"):
                out.append(self.writer.text(text(said["content"])))
            calls = said.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict):
                    continue
                key = f"ollama{self._tools}"
                self._tools += 1
                out.append(self.writer.tool(key, text(call.get("id")) or tool_id(), text(fn.get("name"))))
                out.append(self.writer.tool_input(key, json.dumps(arguments(fn.get("arguments")))))
        if obj.get("done") is True:
            self._final = obj
            reason = stop_reason(obj.get("done_reason"), tools=self._tools > 0, matched=None, stops=[])
            out.append(self.writer.end(reason, ollama_counts(obj)))
        return b"".join(out)

    def finish(self) -> bytes:
        out = b""
        rest = self._lines.rest()
        if rest.strip():
            out = self._line(rest)
        if self.writer.ended:
            return out
        return out + self.error_chunk("the server ended its reply before finishing it")

    def counts(self) -> Counts | None:
        return ollama_counts(self._final)

    def error_chunk(self, message: str) -> bytes:
        return self.writer.error(message)
