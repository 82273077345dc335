"""Request-body parsing and validation, shared by both protocols.

Every failure is a 400 `ApiError` (the lean handler answers it in the route's protocol
shape) raised before the request is routed, so a malformed body never takes a slot.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from routing import schema
from routing.errors import ApiError


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_no_constant)

# Deeper than any request needs, and far from the interpreter's recursion limit (1,000):
# a body the decoder just managed would otherwise fail later, where it is re-encoded for
# an upstream server (json.dumps) a few dozen frames deeper.
MAX_DEPTH = 128


def _too_deep(data: Any) -> bool:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        for item in value.values() if isinstance(value, dict) else value:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return False


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong.

    Refused: an empty body, invalid UTF-8, invalid JSON (including Python's extensions
    NaN/Infinity), an integer longer than Python's int-conversion limit (4,300 digits),
    nesting deeper than MAX_DEPTH, and any value but an object. The depth is walked only
    when the body holds more than MAX_DEPTH brackets (bytes.count: a memchr pass).
    """
    if not body.strip():
        raise ApiError(400, "request body is empty; a JSON object is expected")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    try:
        data = _decoder.decode(text)
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, too many digits, NaN/Infinity
        raise ApiError(400, f"invalid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(data).__name__}")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(data):
        raise ApiError(400, f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    return data


def parse_checked(body: bytes, spec: schema.Obj) -> dict[str, Any]:
    """`parse_object`, then the body's shape checked against `spec` (routing/schema.py)."""
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
    if not model.strip() or len(model) > 500 or any(ord(c) < 32 for c in model):
        raise ApiError(400, f"invalid model name {model!r}")
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
