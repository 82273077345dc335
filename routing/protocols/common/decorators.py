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


def refuse_unless_operator(principal: Principal, what: str) -> None:
    """403 (code `operator_only`) when `principal` is a client key: `what` (e.g. "/api/pull")
    changes the servers for every client, so only the router key (or anyone on an open router)
    may ask for it."""
    if not principal.may_manage:
        raise ApiError(
            403,
            f"{what} changes the servers for every client: only the router's operator key may"
            f" call it, not the client key '{principal.name}'",
            code="operator_only",
        )


def operator_only(view: View) -> View:
    """The view runs for the operator (and on an open router) only: a client key gets a 403 in the
    protocol's error shape (`refuse_unless_operator`)."""

    @functools.wraps(view)
    async def guarded(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponseBase:
        refuse_unless_operator(principal_of(request), request.path)
        return await view(request, *args, **kwargs)

    return guarded
