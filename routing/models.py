from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models


def normalise_url(url: str) -> str:
    """One spelling per server: no surrounding blanks, no trailing slash."""
    return url.strip().rstrip("/")


class Endpoint(models.Model):
    class Kind(models.TextChoices):
        OLLAMA = "ollama", "Ollama"
        OPENAI = "openai", "OpenAI-compatible"

    name = models.CharField(max_length=100, blank=True, help_text="Shown in responses and pages.")
    url = models.CharField(
        max_length=500,
        unique=True,
        help_text="Ollama: http://host:11434. OpenAI-compatible: the base ending in /v1.",
    )
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.OLLAMA)
    api_key = models.CharField(max_length=500, blank=True, help_text="Sent as Bearer token.")
    enabled = models.BooleanField(default=True)
    max_concurrent_connections = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Per model on this server; set it to the server's OLLAMA_NUM_PARALLEL.",
    )
    notes = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(max_concurrent_connections__gte=1),
                name="endpoint_limit_at_least_one",
            )
        ]

    def __str__(self) -> str:
        return self.display_name

    @property
    def display_name(self) -> str:
        return self.name or self.url

    def clean(self) -> None:
        self.url = normalise_url(self.url)
        if not self.url.startswith(("http://", "https://")):
            raise ValidationError({"url": "The url must start with http:// or https://."})
        if self.kind == self.Kind.OPENAI and not self.url.endswith("/v1"):
            raise ValidationError({"url": "An OpenAI-compatible url ends in /v1."})
        if self.kind == self.Kind.OLLAMA and self.url.endswith("/v1"):
            raise ValidationError({"url": "Give an Ollama server's base url, without /v1."})


class RouterSettings(models.Model):
    """Router-wide settings kept in the database (one row), e.g. an imported router api key."""

    api_key = models.CharField(
        max_length=500,
        blank=True,
        help_text="Clients must send it as Bearer token. ROUTER_API_KEY in the environment wins.",
    )
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "router settings"
        verbose_name_plural = "router settings"

    def __str__(self) -> str:
        return "Router settings"

    @classmethod
    def load(cls) -> RouterSettings:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj
