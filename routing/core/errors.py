"""Error replies in each protocol's own shape, so clients raise their usual exceptions."""

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


def error_response(path: str, err: ApiError) -> JsonResponse:
    if is_openai_path(path):
        body: dict[str, object] = {
            "error": {
                "message": err.message,
                "type": OPENAI_TYPES.get(err.status, "api_error"),
                "param": None,
                "code": err.code,
            }
        }
    else:
        body = {"error": err.message}
    response = JsonResponse(body, status=err.status)
    if err.retry_after is not None:
        response["Retry-After"] = str(err.retry_after)
    for name, value in err.headers.items():
        response[name] = value
    return response
