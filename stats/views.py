"""The live usage page (Django's normal path: sessions, login, CSRF)."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone

from stats import charts

RANGES = {
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=30),
}


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "stats/dashboard.html", {"ranges": list(RANGES)})


@staff_member_required
def series(request: HttpRequest) -> JsonResponse:
    """Input and output tokens over a range, and the distribution over endpoints."""
    name = request.GET.get("range", "hour")
    if name not in RANGES:
        return JsonResponse({"error": f"range must be one of {', '.join(RANGES)}"}, status=400)
    end = timezone.now()
    return JsonResponse(charts.series(end - RANGES[name], end, name))
