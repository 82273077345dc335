"""Routes of the client APIs on the lean proxy path (see routing/server/lean_asgi.py): Ollama, OpenAI,
Anthropic's Messages API and
the router's own /health and /metrics. Not part of ROOT_URLCONF; nomyo_site/proxy_urls.py composes it with
the statistics routes."""

from django.urls import path

from routing.protocols.anthropic import views as anthropic_views
from routing.protocols.ollama import fleet_views
from routing.protocols.ollama import views as ollama_views
from routing.protocols.openai import rerank
from routing.protocols.openai import views as openai_views
from routing.protocols.router import views as router_views

urlpatterns = [
    path("api/chat", ollama_views.chat),
    path("api/generate", ollama_views.generate),
    path("api/embed", ollama_views.embed),
    path("api/embeddings", ollama_views.embeddings),
    path("api/show", ollama_views.show),
    path("api/tags", fleet_views.tags),
    path("api/ps", fleet_views.ps),
    path("api/ps_details", fleet_views.ps_details),
    path("api/version", fleet_views.version),
    path("api/pull", fleet_views.pull),
    path("api/push", fleet_views.push),
    path("api/create", fleet_views.create),
    path("api/copy", fleet_views.copy),
    path("api/delete", fleet_views.delete),
    path("api/me", router_views.me),
    path("health", router_views.health),
    path("metrics", router_views.metrics_view),
    path("v1/chat/completions", openai_views.chat_completions),
    path("v1/completions", openai_views.completions),
    path("v1/embeddings", openai_views.embeddings),
    path("v1/messages", anthropic_views.messages),
    path("v1/messages/count_tokens", anthropic_views.count_tokens),
    path("v1/models", openai_views.models),
    path("v1/rerank", rerank.rerank),
    path("rerank", rerank.rerank),  # Jina's and llama.cpp's path; answered in OpenAI's shape too
    path("v1/models/<path:model_id>", openai_views.model),  # a prefix route: label "/v1/models/{model_id}"
]
