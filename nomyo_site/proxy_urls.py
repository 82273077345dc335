"""The route table of the lean proxy path: the client APIs (routing/protocols/urls.py) and the
statistics API (stats/proxy_urls.py). nomyo_site/asgi.py hands its dotted path to `ProxyHandler`."""

from django.urls import URLPattern, URLResolver

from routing.protocols import urls as protocol_urls
from stats import proxy_urls as stats_urls

urlpatterns: list[URLPattern | URLResolver] = [*protocol_urls.urlpatterns, *stats_urls.urlpatterns]
