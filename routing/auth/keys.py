"""Who is calling: the router key, client keys, and the admission of a request.

`admit_request` is what the lean handler calls for every proxied request (routing/server/
lean_asgi.py). The caller's token is `Authorization: Bearer <token>` (what OpenAI clients send as
`api_key`, and Ollama clients as a header) or `x-api-key: <token>`. Then, in order:
- the router key (below): OPERATOR, no limits;
- a client key (routing/auth/client_keys.py): its principal, or 403 when it is disabled or
  expired; then its limits (routing/auth/quotas.py): 429 when over one;
- no key configured at all (no router key, no client key): ANONYMOUS, as before keys existed;
- else 401: no token ("missing key", or what is wrong with an Authorization header that was
  sent: another scheme, no scheme, no key after Bearer), or one that is neither the router key
  nor a client key ("unknown key").

The router key:

Source, in order: settings.ROUTER_API_KEY (environment), else the key stored in the database
(RouterSettings.api_key, set in the admin or by ROUTER_CONFIG's `nomyo-router-api-key`). The
stored key is loaded at start-up and replaced by `set_stored` when it changes; reading it is a
plain attribute read (no lock: a str reference is swapped whole). Tokens are compared with
`hmac.compare_digest`, so the comparison takes the same time wherever they differ.
"""

from __future__ import annotations

import hmac
import time

from django.conf import settings

from routing.auth.client_keys import KEY_PREFIX, key_store
from routing.auth.principal import ANONYMOUS, OPERATOR, Principal
from routing.auth.quotas import NOTHING_TAKEN, Admission, QuotaExceeded, StaleKeys, quotas
from routing.core.errors import ApiError
from routing.observability import metrics


class KeyRefused(ApiError):
    """A 403 for a known client key that may not be used now (disabled, expired); `principal`
    names it in the access log."""

    def __init__(self, principal: Principal, message: str) -> None:
        super().__init__(403, message, code="key_disabled")
        self.principal = principal


class RouterKey:
    def __init__(self) -> None:
        self._stored = ""

    def current(self) -> str:
        """The key in force ("" when none is configured: everyone is let in, as ANONYMOUS)."""
        return settings.ROUTER_API_KEY or self._stored

    def set_stored(self, key: str) -> None:
        """The key stored in the database changed (or was loaded at start-up)."""
        self._stored = key

    def identify(self, authorization: str | None) -> Principal | None:
        """For open routes (/health): never raises; OPERATOR for the router key, ANONYMOUS when
        none is configured, None when one is and the caller did not present it."""
        expected = self.current()
        if not expected:
            return ANONYMOUS
        if authorization and _matches(authorization, expected):
            return OPERATOR
        return None


def _matches(authorization: str, expected: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


router_key = RouterKey()


def presented(authorization: str | None, api_key: str | None) -> str:
    """The token a caller presented: `Authorization: Bearer <token>`, else `x-api-key` ("" none)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return api_key.strip() if api_key else ""


async def authenticate(authorization: str | None, api_key: str | None) -> Principal:
    """The principal of a caller (see the module docstring). Raises ApiError 401, 403, or 503 when
    the client keys could not be loaded yet (the database is away at start-up)."""
    token = presented(authorization, api_key)
    expected = router_key.current()
    if expected and token and hmac.compare_digest(token.encode(), expected.encode()):
        return OPERATOR
    try:
        await key_store.ensure_fresh()  # a comparison of two ints when nothing changed
    except Exception:
        raise _keys_unavailable() from None
    if token:
        record = key_store.get(token)
        if record is None and token.startswith(KEY_PREFIX):  # made a moment ago, elsewhere?
            try:
                await key_store.reload_for_unknown()
            except Exception:
                raise _keys_unavailable() from None
            record = key_store.get(token)
        if record is not None:
            refusal = record.refusal(time.time())
            if refusal is not None:
                raise KeyRefused(record.principal, refusal)
            return record.principal
    if not expected and not key_store.defined():
        return ANONYMOUS  # an open router: a token (OpenAI clients always send one) is ignored
    if not token:
        raise ApiError(401, _why_no_token(authorization))
    raise ApiError(401, "unknown key", code="invalid_api_key")


def _keys_unavailable() -> ApiError:
    """The 503 (retry) for a request the client keys could not be loaded for."""
    return ApiError(503, "the client keys could not be loaded; try again", retry_after=5)


def _why_no_token(authorization: str | None) -> str:
    """The 401 message when no token was found: "missing key" when no header carried one, else
    what is wrong with the Authorization header (never echoing what it carried)."""
    if not authorization or not authorization.strip():
        return "missing key: send Authorization: Bearer <key> or x-api-key: <key>"
    scheme, blank, _ = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return "Authorization: Bearer without a key: send Authorization: Bearer <key>"
    if blank and scheme.isascii() and scheme.isalpha() and len(scheme) <= 20:
        return f"Authorization must be 'Bearer <key>', not the '{scheme}' scheme (or send x-api-key: <key>)"
    return (
        "Authorization must be 'Bearer <key>': the word Bearer, a space, then the key "
        "(or send x-api-key: <key>)"
    )


async def admit_request(authorization: str | None, api_key: str | None) -> tuple[Principal, Admission]:
    """`authenticate`, then the principal's limits. Returns the principal and its admission (to
    release when the request ends, on every path). Raises ApiError 401/403/429/503.

    With REDIS_URL a key change made in another process is seen here before anything is counted:
    the quota check carries the generation of the key copy (StaleKeys), and the copy is reloaded
    and the caller authenticated again; a copy still stale after that is a 503 (retry), never an
    admission."""
    principal = await authenticate(authorization, api_key)
    if principal.kind != "key":
        return principal, NOTHING_TAKEN
    try:
        try:
            admission = await quotas.admit(principal, key_store.redis_generation)
        except StaleKeys:
            key_store.invalidate()
            principal = await authenticate(authorization, api_key)
            if principal.kind != "key":
                return principal, NOTHING_TAKEN
            try:
                admission = await quotas.admit(principal, key_store.redis_generation)
            except StaleKeys:  # changed again meanwhile: never admitted on a copy known stale
                raise ApiError(503, "the client keys are changing; retry", retry_after=1) from None
    except QuotaExceeded as refused:
        metrics.rate_limited.labels(principal.name, refused.limit).inc()
        raise
    key_store.touch(principal)
    return principal, admission
