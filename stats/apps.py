from django.apps import AppConfig


class StatsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "stats"
    verbose_name = "Token statistics"

    def ready(self) -> None:
        # Django's registration point: the apps and models are loaded only from here on.
        from stats import wiring

        wiring.install()
