"""NOMYO Router-compatible statistics routes, served on the lean proxy path (see
routing/server/lean_asgi.py) beside the client APIs; nomyo_site/proxy_urls.py composes them."""

from django.urls import path

from stats import api_views

urlpatterns = [
    path("api/usage", api_views.usage),
    path("api/token_counts", api_views.token_counts),
    path("api/stats", api_views.stats),
    path("api/stats.csv", api_views.stats_csv),
    path("api/aggregate_time_series_days", api_views.aggregate),
    path("api/config", api_views.config),
    path("api/usage-stream", api_views.usage_stream),
]
