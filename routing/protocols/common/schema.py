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

from routing.core.errors import ApiError


class _Bad(Exception):
    """Raised inside the walk; each container on the way out adds its key or index, so
    the success path builds no path strings at all."""

    def __init__(self, what: str, *, required: bool = False) -> None:
        self.what = what
        self.required = required
        self.steps: list[str | int] = []


class Spec:
    """One node of a shape. `what` is how an error message names the expected value;
    `outer` the JSON types it can match (AnyOf picks its option by them)."""

    what: str = "a value"
    outer: tuple[type, ...] = (object,)

    def check(self, value: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def matches_outer(self, value: Any) -> bool:
        return isinstance(value, self.outer) and not (isinstance(value, bool) and bool not in self.outer)


@dataclass(frozen=True, slots=True)
class Anything(Spec):
    """Present, any JSON value (the walk does not look inside)."""

    what: str = "a value"

    def check(self, value: Any) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Str(Spec):
    what: str = "a string"
    choices: frozenset[str] | None = None
    nonblank: bool = False
    outer: tuple[type, ...] = (str,)

    def check(self, value: Any) -> None:
        if value.__class__ is str and self.choices is None and not self.nonblank:
            return  # the usual case, one comparison
        if (
            not isinstance(value, str)
            or (self.choices is not None and value not in self.choices)
            or (self.nonblank and not value.strip())
        ):
            raise _Bad(self.what)


@dataclass(frozen=True, slots=True)
class Bool(Spec):
    what: str = "a boolean"
    outer: tuple[type, ...] = (bool,)

    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise _Bad(self.what)


@dataclass(frozen=True, slots=True)
class Int(Spec):
    what: str = "an integer"
    minimum: int | None = None
    outer: tuple[type, ...] = (int,)
    whole_floats: bool = False  # 100.0 taken as 100 (Ollama's options accept it)

    def check(self, value: Any) -> None:
        if isinstance(value, float) and self.whole_floats and value.is_integer():
            value = int(value)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (self.minimum is not None and value < self.minimum)
        ):
            raise _Bad(self.what)


@dataclass(frozen=True, slots=True)
class Num(Spec):
    what: str = "a number"
    outer: tuple[type, ...] = (int, float)

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(self.what)
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad(self.what)


@dataclass(frozen=True, slots=True)
class ListOf(Spec):
    item: Spec
    what: str = "a list"
    nonempty: bool = False
    outer: tuple[type, ...] = (list,)

    def check(self, value: Any) -> None:
        if not isinstance(value, list) or (self.nonempty and not value):
            raise _Bad(self.what)
        check = self.item.check
        for i, entry in enumerate(value):
            try:
                if entry is None:
                    raise _Bad(self.item.what)
                check(entry)
            except _Bad as bad:
                bad.steps.append(i)
                raise


@dataclass(frozen=True, slots=True)
class Obj(Spec):
    """A JSON object. `fields` are optional unless named in `required`; others pass."""

    fields: Mapping[str, Spec] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    what: str = "an object"
    outer: tuple[type, ...] = (dict,)

    def check(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise _Bad(self.what)
        for name in self.required:  # (a frozenset of 0-1 names)
            if value.get(name) is None:
                bad = _Bad("", required=True)
                bad.steps.append(name)
                raise bad
        fields = self.fields
        # Over the body's keys, not the shape's: a message has 2-3 of its 7 known fields.
        for name, entry in value.items():
            spec = fields.get(name)
            if spec is None or entry is None:
                continue
            try:
                spec.check(entry)
            except _Bad as bad:
                bad.steps.append(name)
                raise


@dataclass(frozen=True, slots=True)
class AnyOf(Spec):
    """The first option whose outer type matches decides (no backtracking into nested
    errors); a scalar option out of range is reported with the AnyOf's own `what`."""

    options: tuple[Spec, ...]
    what: str = "a value"
    outer: tuple[type, ...] = (object,)

    def check(self, value: Any) -> None:
        for option in self.options:
            if option.matches_outer(value):
                if isinstance(option, (Str, Int, Num, Bool)):
                    try:
                        option.check(value)
                    except _Bad:
                        raise _Bad(self.what) from None
                else:
                    option.check(value)
                return
        raise _Bad(self.what)

    def matches_outer(self, value: Any) -> bool:
        return any(option.matches_outer(value) for option in self.options)


def _path(steps: list[str | int]) -> str:
    out = ""
    for step in reversed(steps):
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def check(spec: Obj, body: dict[str, Any]) -> None:
    """Raise a 400 ApiError naming the first field of `body` that does not fit `spec`."""
    try:
        spec.check(body)
    except _Bad as bad:
        path = _path(bad.steps)
        if bad.required:
            raise ApiError(400, f"'{path}' is required") from None
        raise ApiError(
            400, f"'{path}' must be {bad.what}" if path else f"the body must be {bad.what}"
        ) from None


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
            name: Int(whole_floats=True)
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
        # a JSON string per OpenAI; an object is left to the server to accept or refuse
        "function": Obj({"name": STR, "arguments": AnyOf((STR, OBJ), what="a JSON string")}),
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
    "user": STR,  # read for prompt-cache affinity (routing/protocols/common/affinity.py)
}
OPENAI_CHAT = Obj(
    {
        **_OPENAI_COMMON,
        "messages": ListOf(OPENAI_MESSAGE, what="a list of message objects"),
        # OpenAI has tool types beyond "function"; a function tool is checked as Ollama's.
        "tools": ListOf(
            Obj({"type": STR, "function": TOOL.fields["function"]}, what="a tool object"),
            what="a list of tool objects",
        ),
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
