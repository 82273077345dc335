"""Fixes the router makes to a conversation a server refused: too long for its context, or
with images its model cannot see. Each is made at most once per attempt, on the same server
and slot (the engine's `Recover` hook, routing/engine/attempt.py).

Both work on the upstream body the attempt sends (an OpenAI chat body, or Ollama's chat or
generate body): both keep their conversation in `messages`, Ollama its images in `images`.

Context overflow (ROUTER_CONTEXT_TRIM, on by default) is recognised by these servers' words:

- llama.cpp server: HTTP 400, `error.type` "exceed_context_size_error", message "the request
  exceeds the available context size...", with `n_ctx` and `n_prompt_tokens` in the error;
- vLLM: HTTP 400, "This model's maximum context length is N tokens. However, you requested M
  tokens (X in the messages, Y in the completion)" (newer: "...your request has X input tokens");
- Ollama: its "input length exceeds the context length" wording (chat requests are usually
  truncated by Ollama itself and never refused).

The oldest non-system messages are dropped until the estimate fits: system messages, the
latest user message and everything after it are kept; an assistant message with tool calls
and the tool results that follow it go together; the first message kept after the system
ones is a user message (chat templates require it). Tokens are estimated as 4 characters of
a message's JSON each (cheap, and on the high side for English text), an image IMAGE_TOKENS
whatever the size of its data; when the server said
how many tokens the prompt had, the estimate is scaled by it. The target is 3/4 of the
context, leaving 1/4 for the reply. A context size the server gave is remembered per
(endpoint, model) (routing/fleet/context_limits.py) and later conversations for it are trimmed
the same way before they are sent. The reply says how many messages were removed:
`X-Router-Trimmed: <n>`.

Images a model cannot see (ROUTER_IMAGE_RETRY, on by default): llama.cpp's "image input is not
supported" (a model loaded without its mmproj), Ollama's "this model is missing data required
for image input" (HTTP 500) and "does not support images/vision", vLLM's "is not a multimodal
model". The request is sent once more without its images (OpenAI `image_url`/`input_image`
parts, Ollama `images`), the reply says `X-Router-Images-Dropped: <n>`, and
router_image_retries_total{endpoint,model} counts it (model: the model key, as in
router_tokens_total; router_context_trims_total counts trims the same way).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from routing.core.names import model_key
from routing.engine.attempt import Attempt, Retry
from routing.fleet.candidates import Candidate
from routing.fleet.context_limits import context_limits
from routing.observability import metrics

TRIMMED_HEADER = "X-Router-Trimmed"
IMAGES_DROPPED_HEADER = "X-Router-Images-Dropped"
CHARS_PER_TOKEN = 4
PROMPT_SHARE = 0.75  # of the context, for the prompt; the rest is left for the reply
# Tokens counted per image: about what a vision encoder spends on one (Qwen2-VL ~1,000 for a
# 1024-px image, LLaVA 576, Gemma 3 256); on the high side, as the text estimate is.
IMAGE_TOKENS = 1024

_VLLM_LIMIT = re.compile(r"maximum context length is (\d+) tokens")
_VLLM_PROMPT = re.compile(r"(\d+) (?:in the messages|input tokens)")
_OVERFLOW_WORDS = (
    "exceeds the available context size",  # llama.cpp
    "exceed_context_size_error",  # llama.cpp's error type
    "maximum context length is",  # vLLM
    "exceeds the context length",  # Ollama
    "exceeds maximum context length",
    "context length exceeded",
)
_IMAGE_WORDS = (
    "image input is not supported",  # llama.cpp without its mmproj
    "missing data required for image input",  # Ollama
    "does not support images",
    "does not support vision",
    "is not a multimodal model",  # vLLM
)
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


@dataclass(frozen=True, slots=True)
class Overflow:
    """A server's "prompt too long": its context and the prompt's size, in tokens, when said."""

    n_ctx: int | None
    n_prompt: int | None


def _error_of(body: bytes) -> tuple[dict[str, Any], str]:
    """The error object (or {}) and the error text, lower-cased."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}, body[:4096].decode("utf-8", "replace").lower()
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error, str(error.get("message", "")).lower() + " " + str(error.get("type", "")).lower()
    if isinstance(error, str):
        return {}, error.lower()
    return {}, body[:4096].decode("utf-8", "replace").lower()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def overflow(body: bytes) -> Overflow | None:
    """The overflow an error body reports (see the module docstring), or None."""
    error, text = _error_of(body)
    if not any(words in text for words in _OVERFLOW_WORDS):
        return None
    n_ctx, n_prompt = _int(error.get("n_ctx")), _int(error.get("n_prompt_tokens"))
    if n_ctx is None and (found := _VLLM_LIMIT.search(text)):
        n_ctx = int(found.group(1))
    if n_prompt is None and (found := _VLLM_PROMPT.search(text)):
        n_prompt = int(found.group(1))
    return Overflow(n_ctx, n_prompt)


def refuses_images(body: bytes) -> bool:
    """Whether an error body says the model cannot take images."""
    return any(words in _error_of(body)[1] for words in _IMAGE_WORDS)


def _image_chars(message: Any) -> tuple[int, int]:
    """(how many images a message carries, the characters of their data in its JSON): OpenAI
    `image_url` / `input_image` parts, Ollama `images`."""
    if not isinstance(message, dict):
        return 0, 0
    count = chars = 0
    images = message.get("images")
    if isinstance(images, list):
        for image in images:
            if isinstance(image, str):
                count, chars = count + 1, chars + len(image)
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _IMAGE_PARTS:
                continue
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str):
                count, chars = count + 1, chars + len(url)
    return count, chars


def estimate(message: Any) -> int:
    """Estimated tokens of one message: CHARS_PER_TOKEN characters of its JSON each, except
    an image, which counts IMAGE_TOKENS whatever its size (its base64 data is no text: a 1 MB
    screenshot is not 250,000 tokens, and counting it so trimmed every earlier message)."""
    images, image_chars = _image_chars(message)
    text = len(json.dumps(message, ensure_ascii=False)) - image_chars
    return text // CHARS_PER_TOKEN + images * IMAGE_TOKENS + 1


def _groups(messages: list[Any]) -> list[list[int]]:
    """Indices of the non-system messages, grouped: a tool result joins the message before it."""
    groups: list[list[int]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            continue
        if role == "tool" and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def trim(messages: list[Any], target: int) -> tuple[list[Any], int]:
    """The messages without the oldest non-system ones, until their estimate is at most
    `target` tokens (or nothing more may go), and how many were removed. Kept: every system
    message, the latest user message and what follows it; the first non-system message
    kept is a user message."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    last_user = max((i for i, role in enumerate(roles) if role == "user"), default=len(messages) - 1)
    droppable = [g for g in _groups(messages) if g[-1] < last_user and g[0] < last_user]
    costs = [estimate(m) for m in messages]
    total = sum(costs)
    dropped: set[int] = set()
    for group in droppable:
        if total <= target:
            break
        dropped.update(group)
        total -= sum(costs[i] for i in group)
    if not dropped:
        return messages, 0
    # After the cut, the conversation starts at a user message.
    for group in droppable:
        if group[0] in dropped:
            continue
        if roles[group[0]] == "user":
            break
        dropped.update(group)
    return [m for i, m in enumerate(messages) if i not in dropped], len(dropped)


def strip_images(body: dict[str, Any]) -> int:
    """Remove every image from an upstream body, in place; how many were removed."""
    removed = 0
    images = body.get("images")
    if isinstance(images, list) and images:
        removed += len(images)
        del body["images"]
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        images = message.get("images")
        if isinstance(images, list) and images:
            removed += len(images)
            del message["images"]
        content = message.get("content")
        if isinstance(content, list):
            kept = [p for p in content if not (isinstance(p, dict) and p.get("type") in _IMAGE_PARTS)]
            if len(kept) != len(content):
                removed += len(content) - len(kept)
                message["content"] = kept or ""
    return removed


def _budget(n_ctx: int) -> int:
    return int(n_ctx * PROMPT_SHARE)


class Guard:
    """The recovery of one chat or generate attempt for one candidate (its `recover` hook),
    and the trim before sending when the server's context is known."""

    def __init__(self, cand: Candidate) -> None:
        self.endpoint_id = cand.endpoint.id
        self.endpoint_url = cand.endpoint.url
        self.model = cand.backend_model
        self.label = model_key(cand.backend_model)  # as the token counters name it
        self.trimmed = 0
        self.retried_overflow = False
        self.retried_images = False

    def pretrim(self, attempt: Attempt) -> None:
        """Trim before sending when the context is known and the body may not fit (the body's
        length bounds the estimate of its text: the JSON parse happens only then; a small body
        whose images alone would pass the budget is sent as is, and the server's refusal, if
        any, trims it)."""
        n_ctx = context_limits.get(self.endpoint_id, self.model)
        if n_ctx is None or len(attempt.body) // CHARS_PER_TOKEN <= _budget(n_ctx):
            return
        data = _loads(attempt.body)
        if data is None:
            return
        messages = data.get("messages")
        if not isinstance(messages, list):
            return
        kept, removed = trim(messages, _budget(n_ctx))
        if removed:
            self._trimmed(attempt, data, kept, removed)

    def __call__(self, attempt: Attempt, status: int, body: bytes) -> Retry | None:
        if status in (400, 413, 422, 500) and settings.ROUTER_CONTEXT_TRIM and not self.retried_overflow:
            found = overflow(body)
            if found is not None:
                self.retried_overflow = True
                return self._after_overflow(attempt, found)
        if status in (400, 500) and settings.ROUTER_IMAGE_RETRY and not self.retried_images:
            if refuses_images(body):
                self.retried_images = True
                return self._without_images(attempt)
        return None

    def _after_overflow(self, attempt: Attempt, found: Overflow) -> Retry | None:
        if found.n_ctx is not None:
            context_limits.learn(self.endpoint_id, self.model, found.n_ctx)
        data = _loads(attempt.body)
        messages = data.get("messages") if data is not None else None
        if data is None or not isinstance(messages, list):
            return None
        current = sum(estimate(m) for m in messages)
        if found.n_ctx is None:
            target = current // 2  # no numbers given: drop about half
        else:
            # The server's tokens per estimated token, when it said how long the prompt was.
            scale = found.n_prompt / current if found.n_prompt and current else 1.0
            target = int(_budget(found.n_ctx) / max(scale, 0.01))
        # The server said it does not fit: something goes, whatever the estimate says.
        kept, removed = trim(messages, min(target, current - 1))
        if not removed:
            return None
        self._trimmed(attempt, data, kept, removed)
        return Retry(attempt.body, {TRIMMED_HEADER: str(self.trimmed)})

    def _trimmed(self, attempt: Attempt, data: dict[str, Any], kept: list[Any], removed: int) -> None:
        data["messages"] = kept
        attempt.body = json.dumps(data).encode()
        self._follow(attempt, data)
        self.trimmed += removed
        attempt.reply_headers[TRIMMED_HEADER] = str(self.trimmed)
        metrics.context_trims.labels(self.endpoint_url, self.label).inc()

    def _without_images(self, attempt: Attempt) -> Retry | None:
        data = _loads(attempt.body)
        if data is None:
            return None
        removed = strip_images(data)
        if not removed:
            return None
        metrics.image_retries.labels(self.endpoint_url, self.label).inc()
        self._follow(attempt, data)
        return Retry(json.dumps(data).encode(), {IMAGES_DROPPED_HEADER: str(removed)})

    def _follow(self, attempt: Attempt, data: dict[str, Any]) -> None:
        """The body sent instead to a server that refuses `stream_options` (the attempt's
        fallback) gets the same messages."""
        fallback = attempt.fallback_body
        messages = data.get("messages")
        if fallback is None or messages is None:
            return

        def changed() -> bytes:
            original = json.loads(fallback())
            original["messages"] = messages
            return json.dumps(original).encode()

        attempt.fallback_body = changed


def _loads(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def guard(attempt: Attempt, cand: Candidate) -> Attempt:
    """Give a chat or generate attempt its recovery hook, trimmed first when the server's
    context is known (and ROUTER_CONTEXT_TRIM is on)."""
    hook = Guard(cand)  # holds no reference to the attempt: no cycle keeps a large body alive
    if settings.ROUTER_CONTEXT_TRIM:
        hook.pretrim(attempt)
    attempt.recover = hook
    return attempt
