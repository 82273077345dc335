"""What endpoints refuse: reranking per (endpoint, model), for ROUTER_MODELS_TTL seconds."""

from __future__ import annotations

from routing.fleet import caches
from routing.fleet.refusals import ModelRefusals, rerank_refusals


def test_it_remembers_a_refusal_per_endpoint_and_model(settings):
    settings.ROUTER_MODELS_TTL = 300
    refused = ModelRefusals("test")
    refused.add(1, "rr:latest")
    assert refused.refuses(1, "rr:latest")
    assert not refused.refuses(2, "rr:latest") and not refused.refuses(1, "other:latest")
    refused.forget(1)
    assert not refused.refuses(1, "rr:latest")


def test_a_refusal_expires_with_the_model_lists(settings):
    settings.ROUTER_MODELS_TTL = 0  # expired as soon as it is made
    refused = ModelRefusals("test")
    refused.add(1, "rr:latest")
    assert not refused.refuses(1, "rr:latest")


def test_a_changed_endpoint_is_asked_again(settings):
    settings.ROUTER_MODELS_TTL = 300
    rerank_refusals.add(7, "rr:latest")
    caches.invalidate_endpoint(7)
    assert not rerank_refusals.refuses(7, "rr:latest")
