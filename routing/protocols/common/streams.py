"""Reading token counts out of streams that pass through untouched.

The scanners see every chunk exactly as it goes to the client, keep only what they need
(the last complete line, or the pending part of an SSE event) and parse JSON only for the
few lines that can carry counts.
"""

from __future__ import annotations

import json
import re
from typing import Any

from routing.engine.accounting import Counts

MAX_PENDING = 32 * 1024 * 1024  # a line longer than this cannot be a counts line we need

# After a quoted "usage": a key (a "usage" inside a JSON string is escaped, \"usage\") whose
# value is not null.
_USAGE_VALUE = re.compile(rb"\s*:\s*(?!null\b)")


def _first_mark(data: bytes) -> int:
    """Where an SSE reply starts to matter for accounting: the first "usage" key with a value
    other than null, or the end marker; -1 when neither. bytes.find, not a regex search: a
    whole reply can arrive in one read, and a regex alternation scans it byte by byte."""
    done = data.find(b"[DONE]")
    at = data.find(b'"usage"')
    while at >= 0 and (done < 0 or at < done):
        if _USAGE_VALUE.match(data, at + 7):
            return at
        at = data.find(b'"usage"', at + 7)
    return done


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def ollama_counts(reply: Any) -> Counts | None:
    """Counts of a finished Ollama reply: chat/generate final chunk, or an embed reply."""
    if not isinstance(reply, dict):
        return None
    if "embeddings" in reply:
        return Counts(_int(reply.get("prompt_eval_count")), 0)
    if reply.get("done") is not True:
        return None
    return Counts(_int(reply.get("prompt_eval_count")), _int(reply.get("eval_count")))


def openai_counts(reply: Any) -> Counts | None:
    if not isinstance(reply, dict):
        return None
    usage = reply.get("usage")
    if not isinstance(usage, dict):
        return None
    return Counts(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))


class NdjsonScanner:
    """Keeps the last complete line of an NDJSON stream; the final one carries the counts."""

    __slots__ = ("_last", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        # Bytes whose last non-blank line is the last complete line seen: either that line
        # alone, or a whole chunk kept by reference (the usual case, see feed) and cut at the end.
        self._last = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._pending and chunk.endswith(b"}\n"):
            # A chunk of whole lines whose last is a JSON object: keep a reference and look
            # inside it only if it turns out to be the last one (no copy per chunk).
            self._last = chunk
            return chunk
        cut = chunk.rfind(b"\n")
        if cut < 0:
            if len(self._pending) < MAX_PENDING:
                self._pending += chunk
            return chunk
        head = self._pending + chunk[:cut]
        self._pending = chunk[cut + 1 :]
        line = head[head.rfind(b"\n") + 1 :].strip()
        if not line:  # the chunk ended in a blank line: look further back
            lines = [part for part in head.split(b"\n") if part.strip()]
            line = lines[-1].strip() if lines else b""
        if line:
            self._last = line
        return chunk

    def final(self) -> Any:
        line = self._pending.strip()
        if not line:
            last = self._last.rstrip()
            line = last[last.rfind(b"\n") + 1 :].strip()
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            return None


class SseScanner:
    """Splits an SSE stream into events; captures usage and optionally drops usage-only events.

    Events are passed on as soon as they are complete, so the client sees each chunk when
    the backend sends it; only a partial event waits for its end.
    """

    __slots__ = ("_pending", "done", "strip_usage", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self._pending = b""
        self.usage: Counts | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if (
            not self._pending
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
            and b'"usage"' not in chunk
            and b"[DONE]" not in chunk
        ):
            return chunk  # whole events, nothing to count or strip: the usual token chunk
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:  # (one byte: memchr; a two-byte search is 25x slower here)
            # Normalised before looking for the blank line: a CRLF stream cut between the
            # two line ends of an event ("...\n" already normalised + "\r\n") still ends it.
            data = data.replace(b"\r\n", b"\n")
        if b"\n\n" not in data:
            self._pending = data if len(data) < MAX_PENDING else b""
            return b""
        cut = data.rfind(b"\n\n") + 2
        complete, self._pending = data[:cut], data[cut:]
        mark = _first_mark(complete)
        if mark < 0:
            return complete  # nothing to count, or only "usage": null (sent in every chunk by some)
        # The events before the first one that matters pass as they are: under load one read
        # holds a whole reply, and only its last events need looking into.
        at = complete.rfind(b"\n\n", 0, mark)
        start = at + 2 if at >= 0 else 0
        kept: list[bytes] = [complete[:start]]
        for event in complete[start:].split(b"\n\n"):
            if not event:
                continue
            if self._inspect(event):
                kept.append(event + b"\n\n")
        return b"".join(kept)

    def _inspect(self, event: bytes) -> bool:
        """Record what the event tells; False when it must not reach the client."""
        payload = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if payload == b"[DONE]":
            self.done = True
            return True
        if b'"usage"' not in payload:
            return True
        try:
            data = json.loads(payload)
        except ValueError:
            return True
        counts = openai_counts(data)
        if counts is None:
            return True
        self.usage = counts
        usage_only = isinstance(data, dict) and not data.get("choices")
        return not (self.strip_usage and usage_only)

    def flush(self) -> bytes:
        """Whatever is left when the upstream ends (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        if rest.strip() and self._inspect(rest.strip()):
            return rest
        return b""
