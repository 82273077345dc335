"""The router key: the bearer token a client must present when one is configured.

Source, in order: settings.ROUTER_API_KEY (environment), else the key stored in the database
(RouterSettings.api_key, set in the admin or by ROUTER_CONFIG's `nomyo-router-api-key`). The
stored key is loaded at start-up and replaced by `set_stored` when it changes; reading it is a
plain attribute read (no lock: a str reference is swapped whole). Tokens are compared with
`hmac.compare_digest`, so the comparison takes the same time wherever they differ.
"""

from __future__ import annotations

import hmac

from django.conf import settings

from routing.auth.principal import ANONYMOUS, OPERATOR, Principal
from routing.core.errors import ApiError


class RouterKey:
    def __init__(self) -> None:
        self._stored = ""

    def current(self) -> str:
        """The key in force ("" when none is configured: everyone is let in, as ANONYMOUS)."""
        return settings.ROUTER_API_KEY or self._stored

    def set_stored(self, key: str) -> None:
        """The key stored in the database changed (or was loaded at start-up)."""
        self._stored = key

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `Authorization` header value (None: absent).

        No key configured: ANONYMOUS. Else `Bearer <key>` gives OPERATOR; a missing header
        raises ApiError(401), a wrong scheme or key ApiError(403)."""
        expected = self.current()
        if not expected:
            return ANONYMOUS
        if not authorization:
            raise ApiError(401, "missing Authorization: Bearer <router api key>")
        if not _matches(authorization, expected):
            raise ApiError(403, "invalid router api key")
        return OPERATOR

    def identify(self, authorization: str | None) -> Principal | None:
        """Like `authenticate`, for open routes (/health): never raises; None when a key is
        configured and the caller did not present it."""
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
