from django.apps import AppConfig


class RoutingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "routing"
    verbose_name = "Routing"

    def ready(self) -> None:
        # Django's registration point: the apps and models are loaded only from here on.
        from routing import checks  # noqa: F401  (registers the system checks)
        from routing.server import wiring

        wiring.install()
