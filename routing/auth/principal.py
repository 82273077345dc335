"""Who a request acts for: the principal that forwarding and accounting receive.

Today there are two: ANONYMOUS (no router key configured) and OPERATOR (the caller presented
the router key). Client keys ("key") and their quotas come with a later issue; `limits`
already travels with the principal, but nothing enforces it yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from django.http import HttpRequest

Kind = Literal["anonymous", "operator", "key"]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # what accounting and logs name
    kind: Kind
    limits: tuple[tuple[str, int], ...] = ()  # quota name -> allowance; (): none. Carried, not enforced.


ANONYMOUS = Principal("anonymous", "anonymous")
OPERATOR = Principal("operator", "operator")


def principal_of(request: HttpRequest) -> Principal:
    """The principal the lean handler attached to `request` (routing/server/lean_asgi.py).

    A request without one never passed authentication: that is a bug, and it fails closed
    (AttributeError, answered 500 by the handler) rather than acting for anyone."""
    principal = request.principal  # type: ignore[attr-defined]
    if not isinstance(principal, Principal):
        raise AttributeError("request has no principal")
    return principal
