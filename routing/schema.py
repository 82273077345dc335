"""Declarative shapes of the request bodies the router reads or translates, checked before
any slot is taken.

A shape is a small tree of `Spec` objects; `check(spec, value)` walks the value along the
shape and raises a 400 `ApiError` naming the first wrong field by its path, e.g.
"messages[0].images[0] must be a base64 string". Invariants:

- only the fields the router itself reads, forwards in translation or needs to be sure of
  are described; other fields pass untouched (an Ollama server still gets the client's
  exact bytes);
- `null` counts as absent for every optional field (clients send it for "not set");
- the walk follows the shape, never the value, so a deeply nested value in a field the
  shape does not open costs nothing and cannot recurse without bound;
- numbers are finite (1e999 parses as infinity and would be re-serialised as `Infinity`,
  which is not JSON), integers are not booleans.

Field sources: Ollama's docs/api.md (chat, generate, embed, embeddings, show, pull, push,
create, copy, delete) and OpenAI's API reference (chat completions, completions,
embeddings). A plain walker rather than pydantic or msgspec: a typical chat body checks
in a few microseconds here, with no model classes to keep in step with either API.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from routing.errors import ApiError


class Spec:
    """One node of a shape. `what` is how an error message names the expected value."""

    what: str = "a value"

    def check(self, value: Any, path: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _fail(path: str, what: str) -> ApiError:
    return ApiError(400, f"'{path}' must be {what}")


@dataclass(frozen=True, slots=True)
class Anything(Spec):
    """Present, any JSON value (the walk does not look inside)."""

    what: str = "a value"

    def check(self, value: Any, path: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Str(Spec):
    what: str = "a string"
    choices: frozenset[str] | None = None
    nonblank: bool = False

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _fail(path, self.what)
        if self.choices is not None and value not in self.choices:
            raise _fail(path, self.what)
        if self.nonblank and not value.strip():
            raise _fail(path, self.what)


@dataclass(frozen=True, slots=True)
class Bool(Spec):
    what: str = "a boolean"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise _fail(path, self.what)


@dataclass(frozen=True, slots=True)
class Int(Spec):
    what: str = "an integer"
    minimum: int | None = None

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(path, self.what)
        if self.minimum is not None and value < self.minimum:
            raise _fail(path, self.what)


@dataclass(frozen=True, slots=True)
class Num(Spec):
    what: str = "a number"

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, self.what)
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(path, self.what)


@dataclass(frozen=True, slots=True)
class ListOf(Spec):
    item: Spec
    what: str = "a list"
    nonempty: bool = False

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list) or (self.nonempty and not value):
            raise _fail(path, self.what)
        item = self.item
        for i, entry in enumerate(value):
            if entry is None:
                raise _fail(f"{path}[{i}]", item.what)
            item.check(entry, f"{path}[{i}]")


@dataclass(frozen=True, slots=True)
class Obj(Spec):
    """A JSON object. `fields` are optional unless named in `required`; others pass."""

    fields: Mapping[str, Spec] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    what: str = "an object"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _fail(path, self.what)
        prefix = f"{path}." if path else ""
        for name in self.required:
            if value.get(name) is None:
                raise ApiError(400, f"'{prefix}{name}' is required")
        for name, spec in self.fields.items():
            entry = value.get(name)
            if entry is not None:
                spec.check(entry, prefix + name)


@dataclass(frozen=True, slots=True)
class AnyOf(Spec):
    """The first option whose outer type matches decides (no backtracking into nested errors)."""

    options: tuple[Spec, ...]
    what: str = "a value"

    def check(self, value: Any, path: str) -> None:
        for option in self.options:
            if _outer_match(option, value):
                if isinstance(option, (Str, Int, Num, Bool)):
                    try:
                        option.check(value, path)
                    except ApiError:  # a scalar out of range: name what the field takes
                        raise _fail(path, self.what) from None
                else:
                    option.check(value, path)
                return
        raise _fail(path, self.what)


def _outer_match(spec: Spec, value: Any) -> bool:
    if isinstance(spec, Str):
        return isinstance(value, str)
    if isinstance(spec, Bool):
        return isinstance(value, bool)
    if isinstance(spec, Int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(spec, Num):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(spec, ListOf):
        return isinstance(value, list)
    if isinstance(spec, Obj):
        return isinstance(value, dict)
    if isinstance(spec, AnyOf):
        return any(_outer_match(o, value) for o in spec.options)
    return True


def check(spec: Obj, body: dict[str, Any]) -> None:
    """Raise a 400 ApiError naming the first field of `body` that does not fit `spec`."""
    spec.check(body, "")


# --------------------------------------------------------------------------- building blocks

STR = Str()
BOOL = Bool()
INT = Int()
NUM = Num()
OBJ = Obj()
STRINGS = ListOf(STR, what="a list of strings")
STOP = AnyOf((STR, STRINGS), what="a string or a list of strings")
IMAGES = ListOf(Str(what="a base64 string"), what="a list of base64 strings")
# Ollama: a duration string ("5m", "0"), or a number of seconds (negative: forever).
KEEP_ALIVE = AnyOf((Str(), Num()), what="a duration string or a number of seconds")
# Ollama: true/false, or an effort level for the models that take one (gpt-oss).
THINK = AnyOf(
    (Bool(), Str(choices=frozenset({"low", "medium", "high"}))),
    what="a boolean or one of 'low', 'medium', 'high'",
)
FORMAT = AnyOf((Str(), Obj()), what="'json' or a JSON schema object")

# Ollama's options (docs/api.md, "valid parameters and values"): the router translates
# or checks these; any other key is passed to an Ollama server as it is.
OPTIONS = Obj(
    {
        **{
            name: INT
            for name in (
                "num_ctx",
                "num_predict",
                "num_keep",
                "top_k",
                "seed",
                "repeat_last_n",
                "mirostat",
                "num_batch",
                "num_gpu",
                "main_gpu",
                "num_thread",
            )
        },
        **{
            name: NUM
            for name in (
                "temperature",
                "top_p",
                "min_p",
                "typical_p",
                "repeat_penalty",
                "presence_penalty",
                "frequency_penalty",
                "mirostat_tau",
                "mirostat_eta",
                "tfs_z",
            )
        },
        **{name: BOOL for name in ("use_mmap", "use_mlock", "numa", "low_vram", "penalize_newline")},
        "stop": STOP,
    }
)

# Ollama tool call: {"function": {"name": ..., "arguments": {...}}}; some clients send the
# arguments as a JSON string, as OpenAI does.
OLLAMA_TOOL_CALL = Obj(
    {
        "id": STR,
        "type": STR,
        "function": Obj(
            {
                "name": Str(what="a non-empty string", nonblank=True),
                "arguments": AnyOf((Obj(), Str()), what="an object"),
                "index": INT,
            },
            required=frozenset({"name"}),
        ),
    },
    required=frozenset({"function"}),
)
TOOL = Obj(
    {
        "type": STR,
        "function": Obj(
            {"name": Str(what="a non-empty string", nonblank=True), "description": STR, "parameters": OBJ},
            required=frozenset({"name"}),
        ),
    },
    required=frozenset({"function"}),
)
TOOLS = ListOf(TOOL, what="a list of tool objects")

ROLE = Str(what="a non-empty string", nonblank=True)
OLLAMA_MESSAGE = Obj(
    {
        "role": ROLE,
        "content": STR,
        "thinking": STR,
        "images": IMAGES,
        "tool_calls": ListOf(OLLAMA_TOOL_CALL, what="a list of tool calls"),
        "tool_name": STR,
        "tool_call_id": STR,
    },
    required=frozenset({"role"}),
    what="a message object",
)

_OLLAMA_COMMON: dict[str, Spec] = {
    "model": STR,
    "stream": BOOL,
    "options": OPTIONS,
    "format": FORMAT,
    "keep_alive": KEEP_ALIVE,
    "think": THINK,
}

OLLAMA_CHAT = Obj(
    {
        **_OLLAMA_COMMON,
        "messages": ListOf(OLLAMA_MESSAGE, what="a list of message objects"),
        "tools": TOOLS,
    }
)
OLLAMA_GENERATE = Obj(
    {
        **_OLLAMA_COMMON,
        "prompt": STR,
        "suffix": STR,
        "system": STR,
        "template": STR,
        "images": IMAGES,
        "context": ListOf(INT, what="a list of integers"),
        "raw": BOOL,
    }
)
OLLAMA_EMBED = Obj(
    {
        "model": STR,
        "input": AnyOf((STR, STRINGS), what="a string or a list of strings"),
        "truncate": BOOL,
        "dimensions": Int(what="a positive integer", minimum=1),
        "options": OPTIONS,
        "keep_alive": KEEP_ALIVE,
    }
)
OLLAMA_EMBEDDINGS = Obj({"model": STR, "prompt": STR, "options": OPTIONS, "keep_alive": KEEP_ALIVE})
OLLAMA_SHOW = Obj({"model": STR, "name": STR, "verbose": BOOL})

# Fan-out management routes (sent as they are to every Ollama server).
OLLAMA_PULL = Obj({"model": STR, "name": STR, "insecure": BOOL, "stream": BOOL})
OLLAMA_CREATE = Obj(
    {
        "model": STR,
        "name": STR,
        "stream": BOOL,
        "from": STR,
        "files": OBJ,
        "adapters": OBJ,
        "template": STR,
        "license": STOP,
        "system": STR,
        "parameters": OBJ,
        "messages": ListOf(OLLAMA_MESSAGE, what="a list of message objects"),
        "quantize": STR,
        "modelfile": STR,
    }
)
OLLAMA_COPY = Obj({"source": STR, "destination": STR})
OLLAMA_DELETE = Obj({"model": STR, "name": STR})

# OpenAI: the router reads model, stream and stream_options, and counts on the rest being
# the shape OpenAI documents; message content may be a string or a list of parts.
OPENAI_TOOL_CALL = Obj(
    {
        "id": STR,
        "type": STR,
        "function": Obj({"name": STR, "arguments": STR}),
    },
    what="a tool call object",
)
OPENAI_MESSAGE = Obj(
    {
        "role": Str(what="a non-empty string", nonblank=True),
        "content": AnyOf(
            (STR, ListOf(Obj(what="a content part object"))), what="a string or a list of parts"
        ),
        "name": STR,
        "tool_calls": ListOf(OPENAI_TOOL_CALL, what="a list of tool calls"),
        "tool_call_id": STR,
    },
    required=frozenset({"role"}),
    what="a message object",
)
_OPENAI_COMMON: dict[str, Spec] = {
    "model": STR,
    "stream": BOOL,
    "stream_options": Obj({"include_usage": BOOL}),
    "max_tokens": INT,
    "max_completion_tokens": INT,
    "n": Int(what="a positive integer", minimum=1),
    "temperature": NUM,
    "top_p": NUM,
    "seed": INT,
    "stop": STOP,
    "presence_penalty": NUM,
    "frequency_penalty": NUM,
}
OPENAI_CHAT = Obj(
    {
        **_OPENAI_COMMON,
        "messages": ListOf(OPENAI_MESSAGE, what="a list of message objects"),
        "tools": TOOLS,
        "response_format": Obj({"type": STR}),
    }
)
TOKENS = ListOf(INT, what="a list of integers")
OPENAI_COMPLETIONS = Obj(
    {
        **_OPENAI_COMMON,
        "prompt": AnyOf(
            (STR, ListOf(AnyOf((STR, INT, TOKENS), what="a string, a token or a list of tokens"))),
            what="a string or a list of strings or tokens",
        ),
        "suffix": STR,
        "echo": BOOL,
    }
)
OPENAI_EMBEDDINGS = Obj(
    {
        "model": STR,
        "input": AnyOf(
            (STR, ListOf(AnyOf((STR, INT, TOKENS), what="a string, a token or a list of tokens"))),
            what="a string or a list of strings or tokens",
        ),
        "dimensions": Int(what="a positive integer", minimum=1),
        "encoding_format": Str(what="'float' or 'base64'", choices=frozenset({"float", "base64"})),
    },
    required=frozenset({"input"}),
)
