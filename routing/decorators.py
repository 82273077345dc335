"""Small guards for the proxy views."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

from django.http import HttpRequest, HttpResponseBase

from routing.errors import ApiError

View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


def methods(*allowed: str) -> Callable[[View], View]:
    """405 in the protocol's own error shape, with an Allow header."""

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
