"""The router's own routes: /health (for load balancers), /metrics (Prometheus text format) and
/api/me (the caller's key, limits and usage)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse

from routing.auth.keys import router_key
from routing.auth.principal import principal_of
from routing.auth.quotas import quotas
from routing.fleet.breaker import breakers
from routing.fleet.registry import registry
from routing.observability import metrics
from routing.protocols.common.decorators import methods, operator_reads
from routing.protocols.ollama.fleet_views import probe_version
from routing.status.gauges import fleet_gauges
from routing.status.serving import serving


def _shows_detail(request: HttpRequest) -> bool:
    """Whether /health may show per-server detail: always without a router api key; with
    one, only to a caller that sends it (`Authorization: Bearer <key>`). /health itself
    stays open (load balancers probe it without credentials), so a missing or wrong key
    gets the status alone, never a 401."""
    scope = getattr(request, "scope", None)
    if scope is not None:  # the lean path's request: headers only in the ASGI scope
        auth = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), "")
    else:
        auth = request.META.get("HTTP_AUTHORIZATION", "")
    return router_key.identify(auth) is not None


@methods("GET", "HEAD")
async def health(request: HttpRequest) -> HttpResponseBase:
    """200 {"status": "ok"} when at least one enabled server answers its probe, else 503
    {"status": "error"}. With per-server detail, "endpoints": {name: {"status": "ok",
    "version"} | {"status": "error", "error"}}, unless a router api key is set and the
    caller did not send it (see `_shows_detail`). While the router drains: 503
    {"status": "draining"}."""
    if serving.draining:  # shutting down: a load balancer should stop sending here
        return JsonResponse({"status": "draining"}, status=503, headers={"Retry-After": "5"})
    endpoints = await registry.enabled()
    results = await asyncio.gather(*(probe_version(ep) for ep in endpoints))
    detail: dict[str, dict[str, str | float | None]] = {}
    for ep, v, err in results:
        view = breakers.view(ep.id)  # after this probe: its state, the latest evidence, since when
        row: dict[str, str | float | None] = (
            {"status": "ok", "version": v} if v is not None else {"status": "error", "error": err}
        )
        row["breaker"] = view.state.value
        if view.since is not None:
            row["breaker_reason"] = view.reason
            row["breaker_since"] = view.since
        detail[ep.name] = row
    healthy = any(v is not None for _, v, _ in results)
    body: dict[str, Any] = {"status": "ok" if healthy else "error"}
    if _shows_detail(request):
        body["endpoints"] = detail
    return JsonResponse(body, status=200 if healthy else 503)


@methods("GET")
@operator_reads
async def metrics_view(request: HttpRequest) -> HttpResponseBase:
    """Prometheus text format 0.0.4: this process's metrics and the fleet's gauges. Every
    client's series: a client key gets a 403 (`operator_only`); Prometheus scrapes with the
    router key (`authorization: credentials` in its scrape config) or on an open router."""
    return HttpResponse(metrics.render(fleet_gauges), content_type=metrics.CONTENT_TYPE)


LEVEL_NAMES = ("high", "normal", "low")


def _iso_utc(seconds: float | None) -> str | None:
    """UNIX seconds as ISO 8601 UTC with a Z ("2027-01-01T00:00:00Z"); None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@methods("GET")
async def me(request: HttpRequest) -> HttpResponseBase:
    """The caller as the router sees it: {"name", "kind" ("key" | "operator" | "anonymous"),
    "enabled" (always true: a disabled key gets a 403 here too), "expires" (the key's expiry,
    ISO 8601 UTC such as "2027-01-01T00:00:00Z"; null: never),
    "priority" ("high" | "normal" | "low"), "models" (allowed names or patterns; [] every model),
    "limits" {rpm, tpm, concurrency, daily_tokens, monthly_tokens: int | null (none)},
    "usage" {requests_this_minute, tokens_this_minute, tokens_today, tokens_this_month,
    concurrent_requests}}. Windows are UTC minute, day and month. This route is authenticated
    (401/403 as every route, routing/auth/keys.py) but outside the key's limits, and not counted."""
    principal = principal_of(request)
    usage = await quotas.usage(principal)
    names = ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens")
    return JsonResponse(
        {
            "name": principal.name,
            "kind": principal.kind,
            "enabled": True,
            "expires": _iso_utc(principal.expires),
            "priority": LEVEL_NAMES[principal.priority],
            "models": list(principal.models),
            "limits": {name: principal.limit(name) for name in names},
            "usage": usage.as_dict(),
        }
    )
