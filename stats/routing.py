from django.urls import path

from stats import consumers

websocket_urlpatterns = [
    path("ws/usage/", consumers.UsageConsumer.as_asgi()),
]
