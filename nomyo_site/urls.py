from django.contrib import admin
from django.urls import path

from stats import views as stats_views

urlpatterns = [
    path("", stats_views.dashboard, name="dashboard"),
    path("dashboard/", stats_views.dashboard),
    path("dashboard/series.json", stats_views.series, name="dashboard-series"),
    path("admin/", admin.site.urls),
]
