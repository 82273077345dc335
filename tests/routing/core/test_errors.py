"""Error replies in each route's protocol shape (routing/core/errors.py)."""

from __future__ import annotations

import json

import pytest

from routing.core.errors import ApiError, error_response, in_route_shape, is_anthropic_path


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),  # an unlisted 4xx
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
    ],
)
def test_the_anthropic_routes_answer_anthropics_error_object(status: int, kind: str) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens", "//v1/messages"):
        reply = error_response(path, ApiError(status, "why", retry_after=3))
        assert reply.status_code == status and reply["Retry-After"] == "3"
        assert json.loads(reply.content) == {"type": "error", "error": {"type": kind, "message": "why"}}


def test_other_paths_keep_their_shapes() -> None:
    assert not is_anthropic_path("/v1/messages/other") and not is_anthropic_path("/v1/chat/completions")
    openai = json.loads(error_response("/v1/chat/completions", ApiError(503, "busy")).content)
    assert openai == {
        "error": {"message": "busy", "type": "service_unavailable", "param": None, "code": None}
    }
    assert json.loads(error_response("/api/chat", ApiError(503, "busy")).content) == {"error": "busy"}


def test_an_upstream_error_passes_as_it_is_only_when_it_has_the_routes_shape() -> None:
    openai_error = {"error": {"message": "bad", "type": "invalid_request_error"}}
    assert in_route_shape("/v1/chat/completions", openai_error)
    assert not in_route_shape("/v1/chat/completions", {"error": "bad"})
    assert in_route_shape("/api/chat", {"error": "bad"}) and not in_route_shape("/api/chat", openai_error)
    # the Anthropic routes' servers speak OpenAI or Ollama: always rewritten
    assert not in_route_shape("/v1/messages", openai_error) and not in_route_shape(
        "/v1/messages", {"error": "x"}
    )
