"""The live usage page (Django's normal path: sessions, login, CSRF)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone

from routing.models import Endpoint
from stats import charts

RANGES = {
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=30),
}


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {
        "ranges": list(RANGES),
        # Token numbers reach the charts' tables at the recorder's next flush; the page
        # re-reads the charts that long after the live totals change.
        "flush_interval": settings.ROUTER_FLUSH_INTERVAL,
    }
    return render(request, "stats/dashboard.html", context)


@staff_member_required
def series(request: HttpRequest) -> JsonResponse:
    """Input and output tokens over a range, and the distribution over endpoints.

    {"range", "from", "to", "points": [{"t", "input", "output"}],
     "by_endpoint": [{"endpoint": url, "name": the endpoint's name or null, "total"}]}"""
    name = request.GET.get("range", "hour")
    if name not in RANGES:
        return JsonResponse({"error": f"range must be one of {', '.join(RANGES)}"}, status=400)
    end = timezone.now()
    data = charts.series(end - RANGES[name], end, name)
    # Token rows are keyed by the endpoint's url; the charts' legends show its name.
    names = dict(Endpoint.objects.values_list("url", "name"))
    for row in data["by_endpoint"]:
        row["name"] = names.get(row["endpoint"]) or None  # blank names fall back in the page
    return JsonResponse(data)
