"""Error replies in each protocol's own shape, so clients raise their usual exceptions.

Shapes, by path: the Anthropic Messages routes (/v1/messages, /v1/messages/count_tokens)
`{"type": "error", "error": {"type": ..., "message": ...}}` (Anthropic API reference, Errors);
the rest of /v1 OpenAI's `{"error": {"message", "type", "param", "code"}}`; everything else
Ollama's `{"error": "<message>"}`. The status is the router's in every shape.
"""

from __future__ import annotations

from django.http import JsonResponse

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "service_unavailable",
    504: "api_error",
}

# Anthropic's error types by status. The router keeps its own statuses (a full fleet or a drain
# is a 503 with Retry-After, as on every route); 503 and 529 carry Anthropic's
# `overloaded_error`, which its clients retry.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


class ApiError(Exception):
    """Raised anywhere on the proxy path; the handler turns it into the route's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.headers = headers or {}


def is_openai_path(path: str) -> bool:
    """Under /v1 (OpenAI's shape), with any number of leading slashes (`//v1/models`); also
    `/rerank` (llama.cpp's and vLLM's rerank path, whose errors have OpenAI's shape)."""
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path == "/v1" or path.startswith("/v1/") or path == "/rerank"


def is_anthropic_path(path: str) -> bool:
    """One of the Anthropic Messages routes, with any number of leading slashes."""
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path in ANTHROPIC_PATHS


def anthropic_error(status: int, message: str) -> dict[str, object]:
    """Anthropic's error object for `status` (an unknown 4xx is an invalid_request_error,
    an unknown 5xx an api_error, as Anthropic's reference says of unlisted statuses)."""
    kind = ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict[str, object]:
    """The error body of `path`'s protocol (see the module docstring)."""
    if is_anthropic_path(path):
        return anthropic_error(status, message)
    if is_openai_path(path):
        return {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(status, "api_error"),
                "param": None,
                "code": code,
            }
        }
    return {"error": message}


def in_route_shape(path: str, data: object) -> bool:
    """Whether an upstream error body `data` (parsed JSON) already has `path`'s shape and can go
    to the client as it is. Never for the Anthropic routes: their upstreams speak OpenAI or
    Ollama, so their errors are always rewritten."""
    if is_anthropic_path(path):
        return False
    error = data.get("error") if isinstance(data, dict) else None
    if is_openai_path(path):
        return isinstance(error, dict) and isinstance(error.get("message"), str)
    return isinstance(error, str)


def error_response(path: str, err: ApiError) -> JsonResponse:
    response = JsonResponse(error_body(path, err.status, err.message, err.code), status=err.status)
    if err.retry_after is not None:
        response["Retry-After"] = str(err.retry_after)
    for name, value in err.headers.items():
        response[name] = value
    return response
