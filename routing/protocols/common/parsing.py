"""Request-body parsing and validation, shared by both protocols.

Every failure is a 400 `ApiError` (the lean handler answers it in the route's protocol
shape) raised before the request is routed, so a malformed body never takes a slot.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from routing.core.errors import ApiError
from routing.core.names import is_model_name, model_key
from routing.fleet.candidates import Candidate
from routing.protocols.common import schema


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_no_constant)

# Frames of stack kept free under the decoder. The decoder refuses nesting that would pass
# the interpreter's recursion limit from where it runs; a body it just managed could fail
# later, where the router re-encodes it for an upstream server (json.dumps) a few frames
# deeper. Decoding HEADROOM frames deeper than needed means whatever parses also encodes
# anywhere up to HEADROOM frames deeper than the view. (About 1 us a body, whatever its
# size; a byte scan for brackets cost 0.6 us per KB.)
HEADROOM = 32


def _decode(text: str, frames: int = HEADROOM) -> Any:
    if frames:
        return _decode(text, frames - 1)
    return _decoder.decode(text)


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong.

    Refused: an empty body, invalid UTF-8, invalid JSON (including Python's extensions
    NaN/Infinity), an integer longer than Python's int-conversion limit (4,300 digits),
    nesting the decoder cannot reach with HEADROOM frames to spare (see above; about 900
    levels), and any value but an object.
    """
    if not body.strip():
        raise ApiError(400, "request body is empty; a JSON object is expected")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    try:
        data = _decode(text)
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, too many digits, NaN/Infinity
        raise ApiError(400, f"invalid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(data).__name__}")
    return data


def parse_checked(body: bytes, spec: schema.Obj) -> dict[str, Any]:
    """`parse_object`, then the body's shape checked against `spec` (routing/protocols/common/schema.py)."""
    data = parse_object(body)
    schema.check(spec, data)
    return data


def require_model(data: dict[str, Any], *, field: str = "model", alt: str | None = None) -> str:
    model = data.get(field)
    if model is None and alt is not None:
        model = data.get(alt)
    if model is None:
        raise ApiError(400, f"'{field}' is required")
    if not isinstance(model, str):
        raise ApiError(400, f"'{field}' must be a string")
    if not is_model_name(model):
        raise ApiError(400, f"invalid model name {model[:80]!r}")
    return model


def optional_bool(data: dict[str, Any], field: str, default: bool) -> bool:
    value = data.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{field}' must be a boolean")
    return value


def expect_types(data: dict[str, Any], **fields: type | tuple[type, ...]) -> None:
    for name, kinds in fields.items():
        value = data.get(name)
        if value is not None and not isinstance(value, kinds):
            wanted = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
            raise ApiError(400, f"'{name}' must be of type {wanted}")


def with_model(raw: bytes, data: dict[str, Any], cand: Candidate, field: str = "model") -> bytes:
    """The client's exact bytes when `cand` serves the model under the name the client used
    (any spelling of it); else the body re-serialised with `field` set to the server's own
    name for the model (an alias's target, a fallback)."""
    asked = data.get(field)
    if isinstance(asked, str) and model_key(asked) == cand.key:
        return raw
    return json.dumps({**data, field: cand.backend_model}).encode()
