"""Which browser origins may call the router, and the CORS headers that say so.

The policy is Ollama's (`OLLAMA_ORIGINS`, envconfig.AllowedOrigins): the origins listed in
`ROUTER_ORIGINS` (comma-separated) plus a fixed default set, `DEFAULT_ORIGINS`: localhost,
127.0.0.1 and 0.0.0.0 over http and https, with and without any port, and the schemes
desktop and editor apps load their pages from (app, file, tauri, vscode-webview,
vscode-file). The headers follow the Fetch standard's CORS protocol: a preflight
(`OPTIONS` with `Access-Control-Request-Method`) is answered 204 with the allowed methods,
the requested headers echoed and a `Max-Age`; every other reply to an allowed origin
carries `Access-Control-Allow-Origin` (the origin itself, never `*`), `Vary: Origin` and
`Access-Control-Expose-Headers` naming the router's headers clients read.

Pattern syntax: an entry is compared with the whole `Origin` header, case-insensitively;
`*` stands for any run of characters except `/`, `@` and whitespace
(`http://localhost:*`, `https://*.example.com`, `chrome-extension://*`); an entry that is
exactly `*` allows every origin. Quotes, spaces and a trailing `/` around an entry are
ignored. A page's `null` origin matches only an entry `null`.

Invariant: `OriginPolicy` is immutable after construction except for its verdict cache, a
plain dict that only ever maps an origin to the verdict the patterns give (so a race
between two requests can at worst compute the same verdict twice); it is bounded by
clearing it when full.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from django.conf import settings

DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

ALLOW_METHODS = b"GET, HEAD, POST, DELETE, OPTIONS"
# Headers a browser client may send when the preflight does not name them (it always does).
DEFAULT_ALLOW_HEADERS = (
    b"Authorization, X-Api-Key, Content-Type, Accept, User-Agent, X-Requested-With, X-Request-Id"
)
# The router's own headers, and the rate-limit headers OpenAI-compatible servers send and
# OpenAI's clients read, made readable to scripts on the allowed origin.
EXPOSE_HEADERS = (
    b"X-Request-Id, X-Router-Endpoint, X-Router-Model, X-Router-Ignored, Retry-After, "
    b"x-ratelimit-limit-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-requests, "
    b"x-ratelimit-remaining-tokens, x-ratelimit-reset-requests, x-ratelimit-reset-tokens, "
    b"anthropic-ratelimit-requests-limit, anthropic-ratelimit-requests-remaining, "
    b"anthropic-ratelimit-requests-reset, anthropic-ratelimit-tokens-limit, "
    b"anthropic-ratelimit-tokens-remaining, anthropic-ratelimit-tokens-reset"
)
MAX_AGE = b"86400"  # seconds; browsers cap it lower (Chromium at 2 hours)
# A header list as a preflight sends it: tokens (RFC 9110) separated by commas and spaces.
_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~, \t-]{1,2048}")
_CACHE_MAX = 1024


def _pattern(entry: str) -> str:
    return ".*" if entry == "*" else "[^/@\\s]*".join(re.escape(part) for part in entry.split("*"))


def clean(entry: str) -> str:
    """An origin entry as written in settings, stripped of quotes, spaces and a trailing `/`."""
    return entry.strip().strip("\"'").strip().rstrip("/").lower()


class OriginPolicy:
    """Decides whether an `Origin` header value is allowed.

    `patterns`: the entries, defaults included (see the module docstring for the syntax).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        entries = [e for e in (clean(p) for p in patterns) if e]
        self.patterns: tuple[str, ...] = tuple(dict.fromkeys(entries))
        self.allows_any = "*" in self.patterns
        joined = "|".join(f"(?:{_pattern(e)})" for e in self.patterns) or "(?!)"
        self._regex = re.compile(joined, re.IGNORECASE)
        self._verdicts: dict[bytes, bool] = {}

    def allows(self, origin: bytes) -> bool:
        """`origin`: the raw header value. Cached per distinct value (at most 1,024 kept)."""
        verdict = self._verdicts.get(origin)
        if verdict is None:
            try:
                text = origin.decode("ascii").strip()
            except UnicodeDecodeError:
                text = ""
            verdict = bool(text) and (self.allows_any or self._regex.fullmatch(text) is not None)
            if len(self._verdicts) >= _CACHE_MAX:
                self._verdicts.clear()
            self._verdicts[origin] = verdict
        return verdict


@functools.cache
def policy() -> OriginPolicy:
    """The policy of this process: `ROUTER_ORIGINS` first, then `DEFAULT_ORIGINS`."""
    return OriginPolicy([*settings.ROUTER_ORIGINS, *DEFAULT_ORIGINS])


def same_origin(origin: bytes, host: bytes | None) -> bool:
    """True when `origin` names the host the request was sent to (`Host` header): a page
    served by the router itself. Browsers send `Origin` on same-origin POSTs too."""
    if not host:
        return False
    _, sep, authority = origin.partition(b"://")
    return bool(sep) and authority.lower() == host.lower()


def allowed(origin: bytes, host: bytes | None) -> bool:
    """Whether a reply to `origin` may carry CORS headers: the policy allows it, or it names the
    host the request was sent to (`Host` header value, None when absent)."""
    return policy().allows(origin) or same_origin(origin, host)


def reply_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    """Headers added to every reply (any status, streamed or whole) to an allowed origin."""
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-expose-headers", EXPOSE_HEADERS),
        (b"vary", b"Origin"),
    ]


def preflight_headers(origin: bytes, requested: bytes | None) -> list[tuple[bytes, bytes]]:
    """The 204 answer to a preflight from an allowed origin.

    `requested`: the `Access-Control-Request-Headers` value; echoed when it is a plain
    header list (so `authorization` and any client's own headers pass), else the defaults.
    """
    allow_headers = requested.strip() if requested and _HEADER_LIST.fullmatch(requested) else None
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", ALLOW_METHODS),
        (b"access-control-allow-headers", allow_headers or DEFAULT_ALLOW_HEADERS),
        (b"access-control-max-age", MAX_AGE),
        (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        (b"content-length", b"0"),
    ]
