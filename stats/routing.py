"""Websocket routes. Each route carries its own checks, so an unknown path is refused
before any origin, session or database work."""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path, re_path

from stats import consumers

websocket_urlpatterns = [
    path(
        "ws/usage/",
        consumers.origin_parsable(
            AllowedHostsOriginValidator(AuthMiddlewareStack(consumers.UsageConsumer.as_asgi()))
        ),
    ),
    # anything else (channels routes take ASGI apps; django-stubs types re_path for views)
    re_path(r"", consumers.no_route),  # type: ignore[arg-type]
]
