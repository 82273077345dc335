"""Probes of one endpoint: its advertised models, loaded models and version.

Each probe raises `ProbeError` (one message for the log and the page) or returns a value; nothing
is cached here (routing/fleet/caches.py caches them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from routing.core.names import model_key
from routing.fleet.registry import EndpointInfo
from routing.upstream import client as upstream_client
from routing.upstream import failures


class ProbeError(Exception):
    pass


async def _get_json(ep: EndpointInfo, url: str) -> Any:
    client = upstream_client.get_client()
    for retry in (False, True):
        try:
            response = await client.get(
                url,
                headers=upstream_client.auth_headers(ep.api_key),
                timeout=upstream_client.timeouts(first_byte=settings.ROUTER_PROBE_TIMEOUT),
            )
            body = response.content
            break
        except (httpx.HTTPError, OSError) as exc:
            failure = failures.classify(exc)
            if not retry and failure is failures.Failure.DISCONNECTED:
                continue  # a pooled connection the server closed while idle: once more
            raise ProbeError(failure.value) from exc
    if response.status_code != 200:
        raise ProbeError(f"HTTP {response.status_code} from {url.rsplit('/', 1)[-1]}")
    try:
        return response.json() if body else None
    except ValueError:
        raise ProbeError("malformed JSON") from None


@dataclass(frozen=True, slots=True)
class ModelList:
    """Models as one endpoint reports them: raw entries for listing, keys for matching."""

    entries: tuple[dict[str, Any], ...]
    names: tuple[str, ...]
    keys: frozenset[str]

    def backend_name(self, key: str) -> str | None:
        if key not in self.keys:
            return None
        for name in self.names:
            if model_key(name) == key:
                return name
        return None


EMPTY = ModelList((), (), frozenset())


def _model_list(data: Any, list_key: str, name_keys: tuple[str, ...]) -> ModelList:
    if not isinstance(data, dict) or not isinstance(data.get(list_key), list):
        raise ProbeError(f"unexpected reply: no '{list_key}' list")
    entries: list[dict[str, Any]] = []
    names: list[str] = []
    for item in data[list_key]:
        if isinstance(item, dict):
            for key in name_keys:
                if isinstance(item.get(key), str):
                    entries.append(item)
                    names.append(item[key])
                    break
    return ModelList(tuple(entries), tuple(names), frozenset(model_key(n) for n in names))


async def fetch_advertised(ep: EndpointInfo) -> ModelList:
    if ep.is_ollama:
        return _model_list(await _get_json(ep, ep.url + "/api/tags"), "models", ("name", "model"))
    return _model_list(await _get_json(ep, ep.url + "/models"), "data", ("id",))


async def fetch_loaded(ep: EndpointInfo) -> ModelList:
    if not ep.is_ollama:
        return EMPTY
    return _model_list(await _get_json(ep, ep.url + "/api/ps"), "models", ("name", "model"))


async def fetch_version(ep: EndpointInfo) -> str:
    if not ep.is_ollama:
        await fetch_advertised(ep)  # answers: it is up; OpenAI servers have no version route
        return "openai-compatible"
    data = await _get_json(ep, ep.url + "/api/version")
    if not isinstance(data, dict) or not isinstance(data.get("version"), str):
        raise ProbeError("unexpected reply from /api/version")
    return str(data["version"])
