"""Token accounting. Endpoints are stored by url (not a foreign key) so history stays when
an endpoint is renamed or deleted; clients by name (a client key's name, or "anonymous" /
"operator", routing/auth/principal.py) for the same reason. Rows counted before clients
existed carry "anonymous" (migration 0002). `requested_model` is the model the client asked for
when another one served it (an alias's name, or the model whose fallback answered); blank when
the client asked for the model that served, as every row counted before aliases did."""

from __future__ import annotations

from django.db import models


class TokenCounts(models.Model):
    """The counts every token table keeps, per endpoint url, model and client."""

    endpoint = models.CharField(max_length=500)
    model = models.CharField(max_length=500)
    client = models.CharField(
        max_length=100, default="anonymous", help_text="Client key name, or anonymous/operator."
    )
    requested_model = models.CharField(
        max_length=500,
        blank=True,
        default="",
        help_text="The model key the client asked for, when another one served (alias, fallback).",
    )
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    total_tokens = models.BigIntegerField(default=0)
    requests = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


class TokenTotal(TokenCounts):
    """Running totals per (endpoint, model, client, requested model), incremented atomically by
    every flush."""

    incomplete = models.BigIntegerField(default=0, help_text="Requests that ended without counts.")

    class Meta:
        constraints = [
            # The upsert target of every flush.
            models.UniqueConstraint(
                fields=["endpoint", "model", "client", "requested_model"],
                name="tokentotal_endpoint_model_client_req",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} on {self.endpoint}: {self.total_tokens} tokens"


class TokenTimeSeries(TokenCounts):
    """Tokens per (endpoint, model, client, requested model, UTC minute)."""

    timestamp = models.DateTimeField(help_text="Start of the UTC minute.")

    class Meta:
        constraints = [
            # Upsert target of the flush, and /api/stats for one model over a time range
            # (WHERE model = %s AND timestamp BETWEEN ...), which reads this index in order.
            models.UniqueConstraint(
                fields=["model", "timestamp", "endpoint", "client", "requested_model"],
                name="tokenseries_model_ts_endpoint_client_req",
            ),
        ]
        indexes = [
            # Time ranges over every model: charts, CSV export, roll-up (WHERE timestamp < %s).
            models.Index(fields=["timestamp"], name="tokenseries_timestamp"),
        ]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M} {self.model} on {self.endpoint}: {self.total_tokens}"


class TokenDaily(TokenCounts):
    """Time-series rows older than the retention window, folded into one row per (endpoint, model,
    client, requested model, UTC day)."""

    day = models.DateField()

    class Meta:
        constraints = [
            # Upsert target of the roll-up, and daily history for one model (WHERE model = %s AND day ...).
            models.UniqueConstraint(
                fields=["model", "day", "endpoint", "client", "requested_model"],
                name="tokendaily_model_day_endpoint_client_req",
            ),
        ]
        indexes = [
            # Daily ranges over every model (WHERE day BETWEEN ...).
            models.Index(fields=["day"], name="tokendaily_day"),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.model} on {self.endpoint}: {self.total_tokens}"
