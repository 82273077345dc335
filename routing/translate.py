"""Ollama requests served by OpenAI-compatible backends: request and reply translation.

A model that only a llama.cpp or vLLM server has is still usable through /api/chat,
/api/generate and /api/embed. Requests are rewritten into /chat/completions,
/completions or /embeddings; replies (SSE or whole) come back in Ollama's shapes with
`prompt_eval_count`/`eval_count` taken from `usage`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from routing.board import Candidate
from routing.proxy import Attempt
from routing.streams import Counts, openai_counts

# Ollama option -> OpenAI parameter
_OPTIONS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def _now() -> str:
    return datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")


def _image_part(image: str) -> dict[str, Any]:
    url = image if image.startswith("data:") else f"data:image/png;base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _message(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict):
        return {"role": "user", "content": str(msg)}
    out: dict[str, Any] = {"role": msg.get("role", "user")}
    content = msg.get("content") or ""
    images = msg.get("images") or []
    if images:
        out["content"] = [{"type": "text", "text": content}, *(_image_part(i) for i in images)]
    else:
        out["content"] = content
    if msg.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {
                    "name": call.get("function", {}).get("name", ""),
                    "arguments": json.dumps(call.get("function", {}).get("arguments", {})),
                },
            }
            for i, call in enumerate(msg["tool_calls"])
            if isinstance(call, dict)
        ]
    if msg.get("role") == "tool" and msg.get("tool_name"):
        out["name"] = msg["tool_name"]
    return out


def _common(data: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    options = data.get("options") or {}
    if isinstance(options, dict):
        for src, dst in _OPTIONS.items():
            if options.get(src) is not None:
                body[dst] = options[src]
    fmt = data.get("format")
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": fmt},
        }
    return body


def chat_request(data: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body = _common(data, model, stream)
    body["messages"] = [_message(m) for m in data.get("messages") or []]
    if data.get("tools"):
        body["tools"] = data["tools"]
    return body


def generate_request(data: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body = _common(data, model, stream)
    messages: list[dict[str, Any]] = []
    if data.get("system"):
        messages.append({"role": "system", "content": data["system"]})
    messages.append(
        _message({"role": "user", "content": data.get("prompt") or "", "images": data.get("images")})
    )
    body["messages"] = messages
    return body


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls or []:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", "")
        try:
            parsed = json.loads(args) if isinstance(args, str) and args else (args or {})
        except ValueError:
            parsed = {"raw": args}
        out.append({"function": {"name": fn.get("name", ""), "arguments": parsed}})
    return out


def _final(model: str, counts: Counts | None, reason: str | None, started: float, key: str) -> dict[str, Any]:
    elapsed = int((time.perf_counter() - started) * 1e9)
    final: dict[str, Any] = {
        "model": model,
        "created_at": _now(),
        "done": True,
        "done_reason": reason or "stop",
        "total_duration": elapsed,
        "load_duration": 0,
        "prompt_eval_count": counts.prompt if counts else 0,
        "prompt_eval_duration": 0,
        "eval_count": counts.completion if counts else 0,
        "eval_duration": elapsed,
    }
    if key == "message":
        final["message"] = {"role": "assistant", "content": ""}
    else:
        final["response"] = ""
    return final


class ChatFromSse:
    """SSE chat-completion chunks in, Ollama NDJSON chunks out."""

    content_type = "application/x-ndjson"

    def __init__(self, model: str, key: str) -> None:
        self.model = model
        self.key = key  # "message" for /api/chat, "response" for /api/generate
        self._pending = b""
        self._usage: Counts | None = None
        self._reason: str | None = None
        self._tools: dict[int, dict[str, Any]] = {}
        self._done = False
        self._started = time.perf_counter()

    def _line(self, content: str = "", thinking: str = "", tool_calls: list[Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {"model": self.model, "created_at": _now(), "done": False}
        if self.key == "message":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            chunk["message"] = message
        else:
            chunk["response"] = content
            if thinking:
                chunk["thinking"] = thinking
        return json.dumps(chunk).encode() + b"\n"

    def feed(self, chunk: bytes) -> bytes:
        data = (self._pending + chunk).replace(b"\r\n", b"\n")
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: cut + 2], data[cut + 2 :]
        out: list[bytes] = []
        for event in complete.split(b"\n\n"):
            payload = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
            if not payload:
                continue
            if payload == b"[DONE]":
                self._done = True
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            out.extend(self._event(obj))
        return b"".join(out)

    def _event(self, obj: Any) -> list[bytes]:
        if not isinstance(obj, dict):
            return []
        counts = openai_counts(obj)
        if counts is not None:
            self._usage = counts
        out: list[bytes] = []
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if choice.get("finish_reason"):
                self._reason = choice["finish_reason"]
            for call in delta.get("tool_calls") or []:
                slot = self._tools.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            content = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if content or thinking:
                out.append(self._line(content, thinking))
        return out

    def finish(self) -> bytes:
        out = b""
        if self._pending.strip():
            out = self.feed(b"\n\n")
        if self._tools:
            calls = _tool_calls([{"function": t} for _, t in sorted(self._tools.items())])
            out += self._line(tool_calls=calls)
        if self._usage is None and not self._done:
            return out  # cut off: no final chunk, nothing invented
        reason = "stop" if self._reason in (None, "tool_calls") else self._reason
        final = _final(
            self.model, self._usage, "length" if reason == "length" else reason, self._started, self.key
        )
        return out + json.dumps(final).encode() + b"\n"

    def counts(self) -> Counts | None:
        return self._usage

    def error_chunk(self, message: str) -> bytes:
        return json.dumps({"error": message}).encode() + b"\n"


def _chat_body(model: str, key: str):  # type: ignore[no-untyped-def]
    started = time.perf_counter()

    def read(body: bytes) -> tuple[bytes, Counts | None]:
        try:
            obj = json.loads(body)
        except ValueError:
            return body, None
        counts = openai_counts(obj)
        choice = (obj.get("choices") or [{}])[0] if isinstance(obj, dict) else {}
        message = choice.get("message") or {}
        final = _final(model, counts, choice.get("finish_reason"), started, key)
        if final["done_reason"] == "tool_calls":
            final["done_reason"] = "stop"
        content = message.get("content") or ""
        if key == "message":
            final["message"] = {"role": "assistant", "content": content}
            if message.get("tool_calls"):
                final["message"]["tool_calls"] = _tool_calls(message["tool_calls"])
            if message.get("reasoning_content"):
                final["message"]["thinking"] = message["reasoning_content"]
        else:
            final["response"] = content
        return json.dumps(final).encode(), counts

    return read


def _embed_body(model: str):  # type: ignore[no-untyped-def]
    def read(body: bytes) -> tuple[bytes, Counts | None]:
        try:
            obj = json.loads(body)
        except ValueError:
            return body, None
        counts = openai_counts(obj)
        items = sorted(obj.get("data") or [], key=lambda d: d.get("index", 0))
        reply = {
            "model": model,
            "embeddings": [d.get("embedding", []) for d in items],
            "prompt_eval_count": counts.prompt if counts else 0,
        }
        return json.dumps(reply).encode(), counts

    return read


def _legacy_embedding_body(body: bytes) -> tuple[bytes, Counts | None]:
    """/embeddings reply -> the legacy /api/embeddings shape: one vector, no counts field
    (the counts still come from the reply's usage)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body, None
    items = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        return body, None
    return json.dumps({"embedding": items[0].get("embedding", [])}).encode(), openai_counts(obj)


def plan_for_openai_backend(path: str, data: dict[str, Any], stream: bool, cand: Candidate) -> Attempt:
    base = cand.endpoint.openai_base
    model = cand.backend_model
    client_model = str(data.get("model"))
    if path == "/api/embeddings":
        return Attempt(
            url=base + "/embeddings",
            body=json.dumps({"model": model, "input": data.get("prompt", "")}).encode(),
            relay=lambda: ChatFromSse(client_model, "message"),
            read_body=_legacy_embedding_body,
            stream=False,
        )
    if path == "/api/embed":
        body = {"model": model, "input": data.get("input", "")}
        return Attempt(
            url=base + "/embeddings",
            body=json.dumps(body).encode(),
            relay=lambda: ChatFromSse(client_model, "message"),
            read_body=_embed_body(client_model),
            stream=False,
        )
    key = "message" if path == "/api/chat" else "response"
    request = chat_request(data, model, stream) if key == "message" else generate_request(data, model, stream)

    def without_stream_options() -> bytes:  # for a server that refuses the field (proxy.forward)
        return json.dumps({k: v for k, v in request.items() if k != "stream_options"}).encode()

    return Attempt(
        url=base + "/chat/completions",
        body=json.dumps(request).encode(),
        relay=lambda: ChatFromSse(client_model, key),
        read_body=_chat_body(client_model, key),
        stream=stream,
        fallback_body=without_stream_options if "stream_options" in request else None,
    )


def show_for_openai_backend(cand: Candidate) -> Attempt:
    """OpenAI-compatible servers have no /api/show: describe the model from /models."""
    name = cand.backend_model

    def read(body: bytes) -> tuple[bytes, Counts | None]:
        reply = {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": {"format": "", "family": "", "parameter_size": "", "quantization_level": ""},
            "model_info": {"general.name": name},
            "capabilities": ["completion"],
        }
        return json.dumps(reply).encode(), None

    return Attempt(
        url=cand.endpoint.openai_base + "/models",
        body=b"",
        relay=lambda: ChatFromSse(name, "message"),
        read_body=read,
        stream=False,
        method="GET",
    )
