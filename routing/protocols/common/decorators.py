"""Small guards for the proxy views."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

from django.http import HttpRequest, HttpResponseBase

from routing.auth.principal import Principal, principal_of
from routing.core.errors import ApiError

View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


def methods(*names: str) -> Callable[[View], View]:
    """405 in the protocol's own error shape, with an Allow header.

    HEAD is allowed wherever GET is (RFC 9110 9.3.2: same status and headers as GET, no
    body); the view runs as for GET and routing/server/front.py drops the body on the way out.
    """
    allowed = (*names, "HEAD") if "GET" in names and "HEAD" not in names else names

    def wrap(view: View) -> View:
        @functools.wraps(view)
        async def guarded(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponseBase:
            if request.method not in allowed:
                raise ApiError(
                    405,
                    f"method {request.method} not allowed; use {', '.join(allowed)}",
                    headers={"Allow": ", ".join(allowed)},
                )
            return await view(request, *args, **kwargs)

        return guarded

    return wrap


CHANGES_THE_FLEET = "changes the servers for every client"
SHOWS_EVERYONE = "shows the fleet or every client's usage"


def refuse_unless_operator(principal: Principal, what: str, reason: str = CHANGES_THE_FLEET) -> None:
    """403 (code `operator_only`) when `principal` is a client key: `what` (e.g. "/api/pull")
    `reason` (changes the servers for every client; shows the fleet or every client's usage), so
    only the router key (or anyone on an open router) may ask for it."""
    if not principal.may_manage:
        raise ApiError(
            403,
            f"{what} {reason}: only the router's operator key may call it, not the client key"
            f" '{principal.name}'",
            code="operator_only",
        )


def operator_only(view: View) -> View:
    """The view runs for the operator (and on an open router) only: a client key gets a 403 in the
    protocol's error shape (`refuse_unless_operator`)."""
    return _guard(view, CHANGES_THE_FLEET)


def operator_reads(view: View) -> View:
    """As `operator_only`, for a view that changes nothing but shows what one tenant must not see
    of the others: the endpoints, their limits, every client's usage."""
    return _guard(view, SHOWS_EVERYONE)


def _guard(view: View, reason: str) -> View:
    @functools.wraps(view)
    async def guarded(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponseBase:
        refuse_unless_operator(principal_of(request), request.path, reason)
        return await view(request, *args, **kwargs)

    return guarded
