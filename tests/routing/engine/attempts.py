"""Test helper: the upstream request the Ollama views plan for a candidate
(routing/engine/attempt.py `Attempt`), reduced to a one-message chat."""

from __future__ import annotations

import json

from routing.engine.attempt import Attempt
from routing.fleet.candidates import Candidate
from routing.protocols.common.relays import OllamaStream, no_counts, ollama_body


def ollama_chat(cand: Candidate, model: str, *, stream: bool = False, counted: bool = True) -> Attempt:
    """POST <endpoint>/api/chat asking `model` for a reply to "hi"; `counted=False` reads the
    reply as one that carries no token counts."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return Attempt(
        url=cand.endpoint.url + "/api/chat",
        body=json.dumps(body).encode(),
        relay=OllamaStream,
        read_body=ollama_body if counted else no_counts,
        stream=stream,
        counted=counted,
    )
