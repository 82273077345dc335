"""The affinity key of a generation request: which conversation it continues, for prompt-cache
affinity (routing/engine/affinity.py keeps key -> server per model).

In order, the first that the request has:
1. an `X-Session-Id` header (the client names its conversation);
2. the OpenAI `user` field (a string; OpenAI API reference: "a unique identifier representing
   your end-user"), on /v1/messages Anthropic's `metadata.user_id` (Claude Code puts its
   session in it);
3. a hash of the prompt's stable prefix, the part that every later turn repeats unchanged:
   - chat (`/api/chat`, `/v1/chat/completions`): the messages up to and including the first
     `user` message (the system prompt and the opening question). Turn k+1's messages start
     with turn k's, so every turn of a conversation has the same key; two conversations
     differ as soon as their opening differs (the same system prompt and the same opening
     question are, for the server's cache, the same prefix anyway);
   - Anthropic's `/v1/messages`: its top-level `system` (a string or text blocks), then the
     messages as for chat (text blocks are read as OpenAI's text parts);
   - `/api/generate`: `system` and the first PROMPT_CHARS characters of `prompt`; with a
     `context` (a continuation, whose prompt is only the new turn) `system` and the first
     PROMPT_TOKENS tokens of `context` instead. A conversation whose first prompt is shorter
     than PROMPT_CHARS changes key once, when it grows past it;
   - `/v1/completions`: the first PROMPT_CHARS characters (or PROMPT_TOKENS tokens) of the
     prompt (of its first element when a list).

Keys are "s:", "u:" or "p:" and a 32-hex-digit BLAKE2b digest, so the memory per key is fixed
whatever the client sent, and session names and user ids are never stored as given. The cost is
bounded: at most MAX_TEXT characters of any one text and MAX_MESSAGES messages are hashed, read
from the already-parsed body (nothing is re-serialised). None: no key (then the request is
placed as without affinity).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

from django.http import HttpRequest

SESSION_HEADER = b"x-session-id"
MAX_TEXT = 2048  # characters of one message, system prompt or session name hashed
MAX_MESSAGES = 8  # messages hashed at most, if no `user` message came before
PROMPT_CHARS = 512  # characters of a prompt hashed (generate, completions)
PROMPT_TOKENS = 128  # token ids of a tokenised prompt or of `context` hashed


def _digest(prefix: str, data: bytes) -> str:
    return prefix + blake2b(data, digest_size=16).hexdigest()


def session_of(request: HttpRequest) -> str | None:
    """The X-Session-Id header, or None. Read from the ASGI scope (the lean handler's request
    keeps no META), else from Django's headers."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, dict):
        for name, value in scope.get("headers", ()):
            if name == SESSION_HEADER:
                return str(value[: MAX_TEXT * 2].decode("latin-1")) or None
        return None
    value = request.headers.get("X-Session-Id")
    return value or None


def _text(parts: list[str], value: Any) -> None:
    """A message content: a string, or OpenAI's list of parts (text and image urls)."""
    if isinstance(value, str):
        parts.append(str(len(value)))
        parts.append(value[:MAX_TEXT])
    elif isinstance(value, list):
        for part in value[:MAX_MESSAGES]:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                _text(parts, text)
                continue
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                _text(parts, url[-MAX_TEXT:])  # the end of a data: URL differs, its start rarely
    parts.append("")


def _chat_prefix(parts: list[str], messages: Any) -> bool:
    """The messages up to and including the first `user` one (at most MAX_MESSAGES)."""
    if not isinstance(messages, list) or not messages:
        return False
    for message in messages[:MAX_MESSAGES]:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        parts.append(role[:64] if isinstance(role, str) else "?")
        _text(parts, message.get("content"))
        if role == "user":
            break
    return True


def _tokens(parts: list[str], tokens: list[Any]) -> None:
    parts.append(",".join(str(t) for t in tokens[:PROMPT_TOKENS] if isinstance(t, int)))


def _prompt_prefix(parts: list[str], prompt: Any) -> bool:
    if isinstance(prompt, list):
        if not prompt:
            return False
        first = prompt[0]
        if isinstance(first, int):  # one tokenised prompt
            _tokens(parts, prompt)
            return True
        prompt = first
    if isinstance(prompt, str) and prompt:
        parts.append(prompt[:PROMPT_CHARS])
        return True
    if isinstance(prompt, list) and prompt:
        _tokens(parts, prompt)
        return True
    return False


def affinity_key(request: HttpRequest, data: dict[str, Any], path: str) -> str | None:
    """The key of a request to `path` (one of /api/chat, /api/generate, /v1/chat/completions,
    /v1/completions, /v1/messages) with the parsed, checked body `data`; None when it has
    nothing to key on."""
    session = session_of(request)
    if session:
        return _digest("s:", session[:MAX_TEXT].encode("utf-8", "surrogatepass"))
    anthropic = path == "/v1/messages"
    if anthropic:
        metadata = data.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
    else:
        user = data.get("user")
    if isinstance(user, str) and user:
        return _digest("u:", user[:MAX_TEXT].encode("utf-8", "surrogatepass"))
    parts: list[str] = []
    if anthropic:
        _text(parts, data.get("system"))
        found = _chat_prefix(parts, data.get("messages"))
    elif path.endswith("/chat") or path.endswith("/chat/completions"):
        found = _chat_prefix(parts, data.get("messages"))
    elif path == "/api/generate":
        system = data.get("system")
        if isinstance(system, str):
            _text(parts, system)
        context = data.get("context")
        if isinstance(context, list) and context:  # a continuation: its prompt is the new turn alone
            parts.append("c")
            _tokens(parts, context)
            found = True
        else:
            found = _prompt_prefix(parts, data.get("prompt")) or isinstance(system, str)
    else:
        found = _prompt_prefix(parts, data.get("prompt"))
    if not found:
        return None
    return _digest("p:", "\x1f".join(parts).encode("utf-8", "surrogatepass"))
