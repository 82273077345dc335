from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from routing.core.names import is_model_name, model_key, name_list


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
    tier = models.PositiveSmallIntegerField(
        default=0,
        help_text="0 first: requests go to a higher tier only when every server of the lower ones "
        "is full or failing (e.g. GPU boxes 0, CPU boxes 1, a paid remote API 2).",
    )
    weight = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Share of the requests within its tier: a server of weight 2 takes twice the "
        "concurrent requests of a weight 1 server before it counts as busier.",
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
            ),
            models.CheckConstraint(condition=models.Q(weight__gte=1), name="endpoint_weight_at_least_one"),
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


RESERVED_CLIENTS = ("anonymous", "operator")  # usage rows' client names that are not keys

# A key's name goes into the access log (`client=<name>`, `-` for none), usage rows, metrics
# labels and the CSV export: ASCII letters, digits and `_.@-`, starting with a letter, a digit
# or `_` (never `-`, `=`, `+`, `@`: a spreadsheet reads those as a formula), 1 to 100 characters.
KEY_NAME_PATTERN = r"\A[A-Za-z0-9_][A-Za-z0-9_.@-]{0,99}\Z"


def validate_key_name(value: str) -> None:
    """Raise ValidationError unless `value` is a key name (KEY_NAME_PATTERN) other than the
    usage names of the other principals (RESERVED_CLIENTS, in any case)."""
    if not re.match(KEY_NAME_PATTERN, value):
        raise ValidationError(
            "Use 1 to 100 ASCII letters, digits and _ . @ -, starting with a letter, a digit or _ "
            "(no spaces or control characters).",
            code="invalid_key_name",
        )
    if value.lower() in RESERVED_CLIENTS:
        raise ValidationError(f"{value!r} is reserved for usage statistics.", code="reserved_key_name")


# A limit is empty (none) or at least 1: a limit of 0 would refuse every request with a 429
# whose Retry-After a client obeys forever.
LIMIT_HELP = "At least 1; empty: no limit."
AT_LEAST_ONE = [MinValueValidator(1)]


class ClientKey(models.Model):
    """A client's key: who it is, what it may use, its limits and its queue priority.

    The key itself is never stored: only its SHA-256 (`key_hash`; the key has 256 random
    bits, so a fast hash is enough, as for other high-entropy API tokens) and its first
    characters (`prefix`, shown in lists). See routing/auth/client_keys.py for the format.
    `name` follows `validate_key_name`. A limit left empty is no limit, else it is at least 1.
    `allowed_models` empty is every model; text that names no model (",, ,") is refused."""

    class Priority(models.TextChoices):
        HIGH = "high", "High"
        NORMAL = "normal", "Normal"
        LOW = "low", "Low"

    name = models.CharField(
        max_length=100,
        unique=True,
        validators=[validate_key_name],
        help_text="Shown in usage statistics and logs: letters, digits and _ . @ - (no spaces).",
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="client_keys"
    )
    prefix = models.CharField(max_length=16, editable=False, help_text="The key's first characters.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    enabled = models.BooleanField(default=True)
    expires = models.DateTimeField(null=True, blank=True, help_text="Refused from this moment on (UTC).")
    allowed_models = models.TextField(
        blank=True,
        help_text="Comma- or line-separated model names or patterns (llama3*, *:7b); empty: every model.",
    )
    priority = models.CharField(max_length=6, choices=Priority.choices, default=Priority.NORMAL)
    rpm = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=AT_LEAST_ONE,
        verbose_name="requests per minute",
        help_text=LIMIT_HELP,
    )
    tpm = models.PositiveBigIntegerField(
        null=True, blank=True, validators=AT_LEAST_ONE, verbose_name="tokens per minute", help_text=LIMIT_HELP
    )
    concurrency = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=AT_LEAST_ONE,
        verbose_name="concurrent requests",
        help_text=LIMIT_HELP,
    )
    daily_tokens = models.PositiveBigIntegerField(
        null=True, blank=True, validators=AT_LEAST_ONE, verbose_name="tokens per day", help_text=LIMIT_HELP
    )
    monthly_tokens = models.PositiveBigIntegerField(
        null=True, blank=True, validators=AT_LEAST_ONE, verbose_name="tokens per month", help_text=LIMIT_HELP
    )
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(name__in=RESERVED_CLIENTS), name="clientkey_name_not_reserved"
            ),
            *(
                models.CheckConstraint(
                    condition=models.Q(**{f"{limit}__isnull": True}) | models.Q(**{f"{limit}__gte": 1}),
                    name=f"clientkey_{limit}_at_least_one",
                )
                for limit in ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens")
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def clean(self) -> None:
        self.name = self.name.strip()  # the name's own rules: validate_key_name, a field validator
        if self.allowed_models.strip() and not name_list(self.allowed_models):
            raise ValidationError(
                {
                    "allowed_models": "Name at least one model or pattern, or leave it empty for "
                    "every model (the text has only commas and blanks)."
                }
            )


def _clean_name(value: str, field: str) -> str:
    name = value.strip()
    if not is_model_name(name):
        raise ValidationError(
            {field: "Give a model name: not blank, at most 500 characters, no control characters."}
        )
    return name


def _clean_names(value: str, field: str, *, what: str) -> list[str]:
    names = name_list(value)
    if not names:
        raise ValidationError({field: f"Give at least one {what}."})
    bad = [name for name in names if not is_model_name(name)]
    if bad:
        raise ValidationError({field: f"Not a model name: {bad[0][:100]!r}."})
    return names


class ModelAlias(models.Model):
    """A name clients use for one or more real models (the same model is `gpt-oss:120b` on one
    server and `gpt-oss-120b` on another). A request for the alias may go to any server that
    has any target, under that server's own name for it. Targets are real model names, never
    other aliases (one level, no chains of aliases). Names compare as routing/core/names.py
    `model_key` does (`m` is `m:latest`)."""

    name = models.CharField(max_length=500, unique=True, help_text="The name clients ask for.")
    targets = models.TextField(
        help_text="The real model names it stands for, one per line (or comma-separated). "
        "Listings show the details of the first one a server has."
    )
    enabled = models.BooleanField(default=True)
    notes = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "model aliases"

    def __str__(self) -> str:
        return f"{self.name} → {', '.join(self.target_names)}"

    @property
    def target_names(self) -> list[str]:
        return name_list(self.targets)

    def clean(self) -> None:
        self.name = _clean_name(self.name, "name")
        key = model_key(self.name)
        targets = _clean_names(self.targets, "targets", what="target model")
        if any(model_key(t) == key for t in targets):
            raise ValidationError({"targets": "An alias cannot stand for itself."})
        others = ModelAlias.objects.exclude(pk=self.pk)
        other_keys = {model_key(a.name): a.name for a in others}
        if key in other_keys:
            raise ValidationError({"name": f"The alias {other_keys[key]!r} has this name already."})
        aliased = [t for t in targets if model_key(t) in other_keys]
        if aliased:
            raise ValidationError({"targets": f"{aliased[0]!r} is an alias; targets are real model names."})
        for other in others:
            if key in {model_key(t) for t in other.target_names}:
                raise ValidationError({"name": f"{self.name!r} is a target of the alias {other.name!r}."})
        self.targets = "\n".join(targets)


class FallbackChain(models.Model):
    """What to use when no server for a model (or alias) can take a request: the other models or
    aliases in `fallbacks`, tried in order. One level: a fallback's own chain is not followed,
    so chains cannot loop (A → B and B → A are two separate one-step chains)."""

    model = models.CharField(
        max_length=500, unique=True, help_text="The model or alias name clients ask for."
    )
    fallbacks = models.TextField(
        help_text="Models or aliases to try next, in order, one per line (or comma-separated)."
    )
    enabled = models.BooleanField(default=True)
    notes = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return f"{self.model} → {' → '.join(self.fallback_names)}"

    @property
    def fallback_names(self) -> list[str]:
        return name_list(self.fallbacks)

    def clean(self) -> None:
        self.model = _clean_name(self.model, "model")
        key = model_key(self.model)
        fallbacks = _clean_names(self.fallbacks, "fallbacks", what="fallback model")
        others = FallbackChain.objects.exclude(pk=self.pk)
        for other in others:
            if model_key(other.model) == key:
                raise ValidationError({"model": f"{other.model!r} has a fallback chain already."})
        # What each name stands for: an alias's targets, else itself.
        targets = {
            model_key(a.name): {model_key(t) for t in a.target_names} for a in ModelAlias.objects.all()
        }
        itself = targets.get(key, set()) | {key}
        for name in fallbacks:
            if targets.get(model_key(name), {model_key(name)}) <= itself:
                raise ValidationError({"fallbacks": f"{name!r} is {self.model!r} itself."})
        self.fallbacks = "\n".join(fallbacks)
