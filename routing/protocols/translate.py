"""Ollama requests served by OpenAI-compatible servers: request and reply translation.

A model that only a llama.cpp or vLLM server has is still usable through /api/chat,
/api/generate, /api/embed and /api/embeddings. Requests become /chat/completions,
/completions (`raw` or `suffix` generate: the prompt goes as it is, no chat template) or
/embeddings; replies (SSE or whole) come back in Ollama's shapes, with
`prompt_eval_count`/`eval_count` taken from `usage`. The README's section "Ollama requests
on OpenAI-compatible servers" is the table of every field.

Invariants:
- `refusal()` runs in the view before any slot is taken; a field that cannot be
  translated is refused there with a 400 naming it, never dropped in silence;
- the builders below only run on bodies routing/protocols/common/schema.py accepted, and never raise;
- tool-call ids are derived from positions in the conversation (`call_<message>_<call>`),
  so the same conversation always translates to the same request; the `role: tool`
  messages after an assistant turn get the ids of the calls they answer (a given
  `tool_call_id`; else the first unanswered call of their `tool_name`; else the
  unanswered calls in order);
- thinking: `think` is forwarded as `chat_template_kwargs.enable_thinking` (llama.cpp,
  vLLM: the chat template's switch) and, for an effort level, `reasoning_effort`
  (OpenAI's name, also read by vLLM and llama.cpp for gpt-oss); reply fields
  `reasoning_content` (llama.cpp, vLLM, DeepSeek) and `reasoning` (vLLM's newer name,
  OpenRouter) become `thinking`, dropped when the client sent `think: false`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from routing.core.errors import ApiError
from routing.core.names import model_key
from routing.engine.accounting import Counts
from routing.engine.attempt import Attempt, BodyReader
from routing.fleet.candidates import Candidate
from routing.protocols.common.streams import openai_counts

# Ollama option -> the OpenAI-compatible parameters it becomes. Beyond OpenAI's own, the
# names are llama.cpp server's (top_k, min_p, typical_p, repeat_penalty, repeat_last_n,
# mirostat*, n_keep) and vLLM's (top_k, min_p, repetition_penalty); each server ignores
# the other's names.
OPTIONS: dict[str, tuple[str, ...]] = {
    "num_predict": ("max_tokens",),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "min_p": ("min_p",),
    "typical_p": ("typical_p",),
    "seed": ("seed",),
    "stop": ("stop",),
    "presence_penalty": ("presence_penalty",),
    "frequency_penalty": ("frequency_penalty",),
    "repeat_penalty": ("repeat_penalty", "repetition_penalty"),
    "repeat_last_n": ("repeat_last_n",),
    "mirostat": ("mirostat",),
    "mirostat_tau": ("mirostat_tau",),
    "mirostat_eta": ("mirostat_eta",),
    "num_keep": ("n_keep",),
}
INTEGER_OPTIONS = frozenset({"num_predict", "top_k", "seed", "repeat_last_n", "mirostat", "num_keep"})
# Settings an Ollama runner takes when it loads a model; an OpenAI-compatible server fixed them
# when it started. Clients (Open WebUI, LangChain) send num_ctx routinely: they are accepted and
# not forwarded, and the reply names them in `X-Router-Ignored` (`ignored_options`).
SERVER_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa", "low_vram"}
)
ROLES = frozenset({"system", "user", "assistant", "tool"})
THINK_LEVELS = frozenset({"low", "medium", "high"})


def _refuse(field: str, why: str) -> ApiError:
    return ApiError(400, f"'{field}' {why} on an OpenAI-compatible server")


def _option_refusal(options: Any, *, embedding: bool) -> ApiError | None:
    if not isinstance(options, dict):
        return None
    for name, value in options.items():
        if value is None or name in SERVER_OPTIONS:  # load-time settings: ignored, and said so
            continue
        if embedding:
            return _refuse(f"options.{name}", "has no equivalent for embeddings")
        if name not in OPTIONS:
            return _refuse(f"options.{name}", "has no translation")
    return None


IGNORED_HEADER = "X-Router-Ignored"


def ignored_options(data: dict[str, Any]) -> str:
    """The load-time options (SERVER_OPTIONS) this Ollama request sets, as the value of the
    reply's `X-Router-Ignored` header when an OpenAI-compatible server serves it
    ("num_ctx,num_gpu", in the request's order); "" when it sets none."""
    options = data.get("options")
    if not isinstance(options, dict):
        return ""
    return ",".join(name for name, value in options.items() if name in SERVER_OPTIONS and value is not None)


# The fields each route translates (Ollama's docs/api.md); any other field that is set
# (not null) has no translation and is refused by name, e.g. `logprobs`, `shift`.
FIELDS: dict[str, frozenset[str]] = {
    "/api/chat": frozenset(
        {"model", "messages", "tools", "format", "options", "stream", "keep_alive", "think"}
    ),
    "/api/generate": frozenset(
        {
            *("model", "prompt", "suffix", "images", "format", "options", "system", "template"),
            *("stream", "raw", "keep_alive", "context", "think"),
        }
    ),
    # (`stream` on an embedding route: its reply is one object either way)
    "/api/embed": frozenset({"model", "input", "truncate", "options", "keep_alive", "dimensions", "stream"}),
    "/api/embeddings": frozenset({"model", "prompt", "options", "keep_alive", "stream"}),
}
MESSAGE_FIELDS = frozenset(
    {"role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id"}
)


def _unknown(data: dict[str, Any], known: frozenset[str], prefix: str = "") -> ApiError | None:
    for name, value in data.items():
        if name not in known and value is not None:
            return _refuse(prefix + name, "has no translation")
    return None


def refusal(path: str, data: dict[str, Any]) -> ApiError | None:
    """Why this (schema-valid) Ollama request cannot go to an OpenAI-compatible server,
    as a 400 naming the field; None when every field it sets translates."""
    embedding = path in ("/api/embed", "/api/embeddings")
    err = _unknown(data, FIELDS[path]) or _option_refusal(data.get("options"), embedding=embedding)
    if err is not None:
        return err
    if embedding:
        if data.get("truncate") is True:
            return _refuse("truncate", "cannot be honoured (the server refuses an input that is too long)")
        return None
    fmt = data.get("format")
    if isinstance(fmt, str) and fmt not in ("", "json"):
        return ApiError(400, "'format' must be 'json' or a JSON schema object")
    if path == "/api/chat":
        for i, msg in enumerate(data.get("messages") or ()):
            if msg.get("role") not in ROLES:
                return _refuse(f"messages[{i}].role", "must be one of 'system', 'user', 'assistant', 'tool'")
            err = _unknown(msg, MESSAGE_FIELDS, f"messages[{i}].")
            if err is not None:
                return err
        return None
    if data.get("template"):
        return _refuse("template", "cannot replace the server's chat template")
    if data.get("context"):
        return _refuse("context", "cannot be continued (the server keeps no token context)")
    plain = data.get("raw") is True or bool(data.get("suffix"))
    if plain:
        reason = "raw" if data.get("raw") is True else "suffix"
        if data.get("system"):
            return _refuse("system", f"cannot be combined with '{reason}'")
        if data.get("images"):
            return _refuse("images", f"cannot be combined with '{reason}'")
        if data.get("think") not in (None, False):
            return _refuse("think", f"cannot be combined with '{reason}'")
    return None


# --------------------------------------------------------------------------- requests


def now() -> str:
    """The wall clock in Ollama's `created_at` form (RFC 3339, UTC, `Z`)."""
    return datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")


def _image_part(image: str) -> dict[str, Any]:
    url = image if image.startswith("data:") else f"data:image/png;base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def call_id(message_index: int, call_index: int) -> str:
    """The id of the `call_index`-th tool call of the assistant message at `message_index`."""
    return f"call_{message_index}_{call_index}"


def _arguments_text(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args if args is not None else {})


def _pair_results(conversation: list[dict[str, Any]], calls: list[tuple[int, str, str]]) -> dict[int, str]:
    """Message index -> call id for the tool results that follow one assistant turn.

    `calls` are (unused, id, name) of that turn's calls in order. Three passes over the
    consecutive `role: tool` messages: a given `tool_call_id` is kept; a `tool_name` takes
    the first unanswered call of that name; the rest take the unanswered calls in order.
    """
    open_calls = [(cid, name) for _, cid, name in calls]
    results: list[int] = []
    for m in range(calls[0][0] + 1 if calls else 0, len(conversation)):
        if conversation[m].get("role") != "tool":
            break
        results.append(m)
    paired: dict[int, str] = {}
    for m in results:
        given = conversation[m].get("tool_call_id")
        if given:
            paired[m] = given
            open_calls = [c for c in open_calls if c[0] != given]
    for m in results:
        name = conversation[m].get("tool_name")
        if m in paired or not name:
            continue
        match = next((c for c in open_calls if c[1] == name), None)
        if match is not None:
            paired[m] = match[0]
            open_calls.remove(match)
    for m in results:
        if m not in paired and open_calls:
            paired[m] = open_calls.pop(0)[0]
    return paired


def messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages -> OpenAI messages, tool-call ids paired (see the module's invariants)."""
    out: list[dict[str, Any]] = []
    paired: dict[int, str] = {}  # tool result's message index -> the id of the call it answers
    for m, msg in enumerate(conversation):
        role = msg.get("role")
        item: dict[str, Any] = {"role": role}
        content = msg.get("content") or ""
        images = msg.get("images")
        if images:
            item["content"] = [{"type": "text", "text": content}, *map(_image_part, images)]
        else:
            item["content"] = content
        if role == "assistant" and msg.get("thinking"):
            item["reasoning_content"] = msg["thinking"]
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            ids: list[tuple[int, str, str]] = []
            for c, call in enumerate(msg["tool_calls"]):
                fn = call["function"]
                given = call.get("id")
                cid = given if isinstance(given, str) and given else call_id(m, c)
                arguments = _arguments_text(fn.get("arguments"))
                calls.append(
                    {"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": arguments}}
                )
                ids.append((m, cid, fn["name"]))
            item["tool_calls"] = calls
            paired.update(_pair_results(conversation, ids))
        if role == "tool":
            cid = paired.get(m) or _text(msg.get("tool_call_id"))
            if cid:
                item["tool_call_id"] = cid
            if msg.get("tool_name"):
                item["name"] = msg["tool_name"]
        out.append(item)
    return out


def _think(body: dict[str, Any], think: Any) -> None:
    if isinstance(think, bool):
        body["chat_template_kwargs"] = {"enable_thinking": think}
    elif think in THINK_LEVELS:
        body["reasoning_effort"] = think
        body["chat_template_kwargs"] = {"enable_thinking": True}


def _common(data: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    options = data.get("options") or {}
    for src, value in options.items():
        if value is None or src not in OPTIONS:
            continue
        if src == "num_predict" and value < 0:
            continue  # Ollama's -1 (no limit) / -2 (fill the context): no max_tokens at all
        if isinstance(value, float) and src in INTEGER_OPTIONS:
            value = int(
                value
            )  # 100.0, which Ollama takes for 100 (routing/protocols/common/schema.py checked it)
        for dst in OPTIONS[src]:
            body[dst] = value
    fmt = data.get("format")
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    return body


def chat_request(data: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body = _common(data, model, stream)
    body["messages"] = messages(data.get("messages") or [])
    if data.get("tools"):
        body["tools"] = data["tools"]
    _think(body, data.get("think"))
    return body


def generate_request(data: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body = _common(data, model, stream)
    if is_plain_completion(data):
        body["prompt"] = data.get("prompt") or ""
        if data.get("suffix"):
            body["suffix"] = data["suffix"]
        return body
    conversation: list[dict[str, Any]] = []
    if data.get("system"):
        conversation.append({"role": "system", "content": data["system"]})
    conversation.append({"role": "user", "content": data.get("prompt") or "", "images": data.get("images")})
    body["messages"] = messages(conversation)
    _think(body, data.get("think"))
    return body


def is_plain_completion(data: dict[str, Any]) -> bool:
    """A generate request that goes to /completions: `raw` (no template) or `suffix` (fill in)."""
    return data.get("raw") is True or bool(data.get("suffix"))


# --------------------------------------------------------------------------- replies


def _parse_arguments(args: Any) -> dict[str, Any]:
    if isinstance(args, dict):
        return args
    if not isinstance(args, str) or not args.strip():
        return {}
    try:
        parsed = json.loads(args)
    except (ValueError, RecursionError):
        return {"raw": args}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def ollama_tool_call(index: int, cid: str, name: str, args: Any) -> dict[str, Any]:
    """One tool call in Ollama's reply shape, with the server's id kept so a client that
    echoes it back (as `tool_calls[].id` / `tool_call_id`) pairs it with its result."""
    return {
        "id": cid or f"call_{index}",
        "function": {"index": index, "name": name, "arguments": _parse_arguments(args)},
    }


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls if isinstance(calls, list) else ()):
        if not isinstance(call, dict):
            continue
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        out.append(ollama_tool_call(i, _text(call.get("id")), _text(fn.get("name")), fn.get("arguments")))
    return out


def _done_reason(reason: Any) -> str:
    if reason == "length":
        return "length"
    return reason if isinstance(reason, str) and reason not in ("tool_calls", "function_call") else "stop"


def _final(model: str, counts: Counts | None, reason: Any, started: float, key: str) -> dict[str, Any]:
    elapsed = int((time.perf_counter() - started) * 1e9)
    final: dict[str, Any] = {
        "model": model,
        "created_at": now(),
        "done": True,
        "done_reason": _done_reason(reason),
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


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _thinking_of(part: dict[str, Any]) -> str:
    return _text(part.get("reasoning_content")) or _text(part.get("reasoning"))


@dataclass(slots=True)
class _ToolDelta:
    id: str = ""
    name: str = ""
    arguments: str = ""


class ChatFromSse:
    """SSE chat-completion (or completion) chunks in, Ollama NDJSON chunks out.

    Tool calls arrive as deltas keyed by `index` (the id and name usually only on the
    first; arguments split over many; several calls interleaved); a server that leaves
    out `index` is keyed by id, a delta with neither continues the last call. They are
    assembled and sent as one chunk when the choice finishes, as Ollama does.
    """

    content_type = "application/x-ndjson"

    def __init__(self, model: str, key: str, *, think: Any = None, completion: bool = False) -> None:
        self.model = model
        self.key = key  # "message" for /api/chat, "response" for /api/generate
        self.keep_thinking = think is not False
        self.completion = completion  # /completions events: choices[].text
        self._pending = b""
        self._usage: Counts | None = None
        self._reason: Any = None
        self._tools: dict[int, _ToolDelta] = {}
        self._tool_ids: dict[str, int] = {}
        self._last_tool = 0
        self._done = False
        self._started = time.perf_counter()

    def _line(self, content: str = "", thinking: str = "", tool_calls: list[Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {"model": self.model, "created_at": now(), "done": False}
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
            except (ValueError, RecursionError):
                continue
            out.extend(self._event(obj))
        return b"".join(out)

    def _tool_delta(self, call: dict[str, Any]) -> None:
        cid = _text(call.get("id"))
        index = call.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            if cid and cid in self._tool_ids:
                index = self._tool_ids[cid]
            elif cid:
                index = max(self._tools, default=-1) + 1
            else:
                index = self._last_tool
        self._last_tool = index
        slot = self._tools.setdefault(index, _ToolDelta())
        if cid and not slot.id:
            slot.id = cid
            self._tool_ids[cid] = index
        fn = call.get("function")
        if not isinstance(fn, dict):
            return
        name = _text(fn.get("name"))
        if name and name != slot.name:
            slot.name += name  # a name split over deltas; a repeated whole name is not doubled
        args = fn.get("arguments")
        if isinstance(args, str):
            slot.arguments += args
        elif isinstance(args, dict):
            slot.arguments += json.dumps(args)

    def _flush_tools(self) -> list[bytes]:
        if not self._tools:
            return []
        calls = [ollama_tool_call(i, t.id, t.name, t.arguments) for i, t in sorted(self._tools.items())]
        self._tools.clear()
        self._tool_ids.clear()
        return [self._line(tool_calls=calls)]

    def _event(self, obj: Any) -> list[bytes]:
        if not isinstance(obj, dict):
            return []
        counts = openai_counts(obj)
        if counts is not None:
            self._usage = counts
        out: list[bytes] = []
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            if self.completion:
                content, thinking = _text(choice.get("text")), ""
            else:
                delta = choice.get("delta")
                delta = delta if isinstance(delta, dict) else {}
                calls = delta.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    if isinstance(call, dict):
                        self._tool_delta(call)
                content = _text(delta.get("content"))
                thinking = _thinking_of(delta) if self.keep_thinking else ""
            if content or thinking:
                out.append(self._line(content, thinking))
            if choice.get("finish_reason"):
                self._reason = choice["finish_reason"]
                out.extend(self._flush_tools())
        return out

    def finish(self) -> bytes:
        out = b""
        if self._pending.strip():
            out = self.feed(b"\n\n")
        out += b"".join(self._flush_tools())
        if self._usage is None and not self._done:
            return out  # cut off: no final chunk, nothing invented
        final = _final(self.model, self._usage, self._reason, self._started, self.key)
        return out + json.dumps(final).encode() + b"\n"

    def counts(self) -> Counts | None:
        return self._usage

    def error_chunk(self, message: str) -> bytes:
        return json.dumps({"error": message}).encode() + b"\n"


def _load(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def whole_reply(model: str, key: str, *, think: Any = None, completion: bool = False) -> BodyReader:
    """A whole chat-completion (or completion) reply -> Ollama's whole chat/generate reply."""
    started = time.perf_counter()
    keep_thinking = think is not False

    def read(body: bytes) -> tuple[bytes, Counts | None]:
        obj = _load(body)
        if not isinstance(obj, dict):
            return body, None
        counts = openai_counts(obj)
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        final = _final(model, counts, choice.get("finish_reason"), started, key)
        content = _text(choice.get("text")) if completion else _text(message.get("content"))
        thinking = _thinking_of(message) if keep_thinking and not completion else ""
        if key == "message":
            final["message"] = {"role": "assistant", "content": content}
            if thinking:
                final["message"]["thinking"] = thinking
            calls = _tool_calls(message.get("tool_calls"))
            if calls:
                final["message"]["tool_calls"] = calls
        else:
            final["response"] = content
            if thinking:
                final["thinking"] = thinking
        return json.dumps(final).encode(), counts

    return read


def _embed_body(model: str) -> BodyReader:
    def read(body: bytes) -> tuple[bytes, Counts | None]:
        obj = _load(body)
        if not isinstance(obj, dict):
            return body, None
        counts = openai_counts(obj)
        data = obj.get("data")
        items = [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
        items.sort(key=lambda d: d["index"] if isinstance(d.get("index"), int) else 0)
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
    obj = _load(body)
    items = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        return body, None
    return json.dumps({"embedding": items[0].get("embedding", [])}).encode(), openai_counts(obj)


def plan_for_openai_backend(path: str, data: dict[str, Any], stream: bool, cand: Candidate) -> Attempt:
    """The upstream request for an Ollama request `data` (schema-checked, `refusal()` None)."""
    base = cand.endpoint.openai_base
    model = cand.backend_model
    # The model field of the reply: the client's own spelling, unless the request was sent to
    # another model (an alias's target, a fallback): then the model that answered.
    client_model = str(data.get("model"))
    if model_key(client_model) != cand.key:
        client_model = model
    if path in ("/api/embeddings", "/api/embed"):
        legacy = path == "/api/embeddings"
        body: dict[str, Any] = {"model": model, "input": data.get("prompt" if legacy else "input") or ""}
        if not legacy and data.get("dimensions") is not None:
            body["dimensions"] = data["dimensions"]
        return Attempt(
            url=base + "/embeddings",
            body=json.dumps(body).encode(),
            relay=lambda: ChatFromSse(client_model, "message"),
            read_body=_legacy_embedding_body if legacy else _embed_body(client_model),
            stream=False,
        )
    think = data.get("think")
    if path == "/api/chat":
        key, completion = "message", False
        request = chat_request(data, model, stream)
    else:
        key, completion = "response", is_plain_completion(data)
        request = generate_request(data, model, stream)

    def without_stream_options() -> bytes:  # for a server that refuses the field (proxy.forward)
        return json.dumps({k: v for k, v in request.items() if k != "stream_options"}).encode()

    return Attempt(
        url=base + ("/completions" if completion else "/chat/completions"),
        body=json.dumps(request).encode(),
        relay=lambda: ChatFromSse(client_model, key, think=think, completion=completion),
        read_body=whole_reply(client_model, key, think=think, completion=completion),
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
