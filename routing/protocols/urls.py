"""URLs of the lean proxy path (see routing/lean_asgi.py). Not part of ROOT_URLCONF."""

from django.urls import path

from routing import fleet_views, ollama_views, openai_views
from stats import api_views

urlpatterns = [
    path("api/chat", ollama_views.chat),
    path("api/generate", ollama_views.generate),
    path("api/embed", ollama_views.embed),
    path("api/embeddings", ollama_views.embeddings),
    path("api/show", ollama_views.show),
    path("api/tags", fleet_views.tags),
    path("api/ps", fleet_views.ps),
    path("api/version", fleet_views.version),
    path("api/pull", fleet_views.pull),
    path("api/push", fleet_views.push),
    path("api/create", fleet_views.create),
    path("api/copy", fleet_views.copy),
    path("api/delete", fleet_views.delete),
    path("health", fleet_views.health),
    path("metrics", fleet_views.metrics_view),
    path("v1/chat/completions", openai_views.chat_completions),
    path("v1/completions", openai_views.completions),
    path("v1/embeddings", openai_views.embeddings),
    path("v1/models", openai_views.models),
    # NOMYO Router-compatible statistics
    path("api/usage", api_views.usage),
    path("api/token_counts", api_views.token_counts),
    path("api/stats", api_views.stats),
    path("api/stats.csv", api_views.stats_csv),
    path("api/aggregate_time_series_days", api_views.aggregate),
    path("api/config", api_views.config),
    path("api/usage-stream", api_views.usage_stream),
]
