from django.contrib import admin
from django.urls import path

from stats import views as stats_views

urlpatterns = [
    # `/` itself is answered in nomyo_site/asgi.py (routing/server/front.py): Ollama's answer for
    # API clients, a redirect here for a browser. /favicon.ico is whitenoise's
    # (WHITENOISE_ROOT, settings.py).
    path("dashboard/", stats_views.dashboard, name="dashboard"),
    path("dashboard/series.json", stats_views.series, name="dashboard-series"),
    path("admin/", admin.site.urls),
]
