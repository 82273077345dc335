"""The OpenAI-compatible servers' side of /api/ps_details (routing/protocols/ollama/fleet_views.py)."""

from __future__ import annotations

from routing.fleet.context_limits import context_limits
from routing.fleet.registry import EndpointInfo
from routing.protocols.ollama.fleet_views import _loaded_on_openai, _openai_details

EP = EndpointInfo(
    id=77, name="gpu-a", url="http://127.0.0.1:9/v1", kind="openai", api_key="k", enabled=True, limit=1
)


def test_a_model_is_loaded_unless_llama_cpp_s_router_mode_says_otherwise():
    assert _loaded_on_openai({"id": "m"})  # a single-model server: its one model
    assert _loaded_on_openai({"id": "m", "status": {"value": "loaded"}})
    assert not _loaded_on_openai({"id": "m", "status": {"value": "unloaded"}})
    assert not _loaded_on_openai({"id": "m", "status": {"value": "loading"}})


def test_it_gives_nomyo_s_fields_and_the_context_once_known():
    context_limits.forget(77)
    entry = {
        "id": "m",
        "created": 5,
        "owned_by": "llamacpp",
        "status": {"value": "loaded", "args": ["-c", "4096"]},
    }
    found = _openai_details(EP, entry, "m")
    assert found == {
        "name": "m",
        "id": "m",
        "original_name": "m",
        "digest": "",
        "details": {},
        "endpoint": "http://127.0.0.1:9/v1",
        "endpoint_name": "gpu-a",
        "status": {"value": "loaded", "args": ["-c", "4096"]},
        "created": 5,
        "owned_by": "llamacpp",
        "llama_status_args": ["-c", "4096"],
        "llama_status_preset": None,
    }
    assert "k" not in found.values()  # never the endpoint's key
    context_limits.learn(77, "m", 4096)
    assert _openai_details(EP, entry, "m")["context_length"] == 4096
    context_limits.forget(77)
