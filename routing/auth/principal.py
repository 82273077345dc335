"""Who a request acts for: the principal that forwarding and accounting receive.

ANONYMOUS (no key configured anywhere), OPERATOR (the caller presented the router key: no
limits, high priority) and client keys (kind "key", routing/auth/client_keys.py), whose
`limits` routing/auth/quotas.py enforces and whose `models` `may_use` checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal, NoReturn

from django.http import HttpRequest

from routing.core.errors import ApiError

Kind = Literal["anonymous", "operator", "key"]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # what accounting and logs name
    kind: Kind
    limits: tuple[tuple[str, int], ...] = ()  # quota name -> allowance; (): none (routing/auth/quotas.py)
    priority: int = 1  # queue priority: 0 high, 1 normal, 2 low (routing/engine/fair_queue.py)
    models: tuple[str, ...] = ()  # allowed model names or fnmatch patterns; (): every model
    key_id: int = 0  # the ClientKey row (kind "key"), else 0
    expires: float | None = None  # the key's expiry, UNIX seconds (kind "key"); None: never

    def limit(self, name: str) -> int | None:
        """The allowance named `name` (rpm, tpm, concurrency, daily_tokens, monthly_tokens), None: none."""
        for quota, allowance in self.limits:
            if quota == name:
                return allowance
        return None

    @property
    def may_manage(self) -> bool:
        """Whether this principal may change the fleet for everyone (pull, push, create, copy,
        delete, unload): the operator and, on an open router, anyone; never a client key."""
        return self.kind != "key"

    def may_use(self, model: str) -> bool:
        """Whether this principal may use `model` (matched as given and without a ":latest" tag)."""
        if not self.models:
            return True
        base = model[: -len(":latest")] if model.endswith(":latest") else model
        return any(fnmatchcase(model, p) or fnmatchcase(base, p) for p in self.models)


def refuse_model(principal: Principal, model: str) -> NoReturn:
    """Raise ApiError 403 (code `model_not_allowed`): `principal` may not use `model`. Which names
    a key may ask for, aliases included, is routing/fleet/routes.py `ModelRoutes.may_use`."""
    raise ApiError(
        403, f"the key '{principal.name}' may not use the model '{model}'", code="model_not_allowed"
    )


ANONYMOUS = Principal("anonymous", "anonymous")
OPERATOR = Principal("operator", "operator", priority=0)


def principal_of(request: HttpRequest) -> Principal:
    """The principal the lean handler attached to `request` (routing/server/lean_asgi.py).

    A request without one never passed authentication: that is a bug, and it fails closed
    (AttributeError, answered 500 by the handler) rather than acting for anyone."""
    principal = request.principal  # type: ignore[attr-defined]
    if not isinstance(principal, Principal):
        raise AttributeError("request has no principal")
    return principal
