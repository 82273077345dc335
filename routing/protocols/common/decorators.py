"""Small guards for the proxy views."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

from django.http import HttpRequest, HttpResponseBase

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
