"""Settings, all read from the environment (see .env.example) with safe development defaults."""

import logging
from pathlib import Path

import django_stubs_ext
import environ

from nomyo_site.secret_key import load_or_create

django_stubs_ext.monkeypatch()  # lets admin and form classes be subscripted for type checking

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"  # git-ignored: the embedded SQLite database lives here

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
# Never a public default: unset, the key is generated once and kept in var/secret_key
# (mode 0600, beside the embedded database); see nomyo_site/secret_key.py.
VAR_DIR.mkdir(exist_ok=True)
SECRET_KEY = env("SECRET_KEY", default="") or load_or_create(VAR_DIR / "secret_key")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "routing",
    "stats",
]

# The normal, fully safe Django path: admin, login and pages. The proxy routes never
# go through this list; they have their own lean async chain (routing/server/lean_asgi.py).
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Messages live in the session (server side), not in a cookie: the admin shows a new client key
# once in a message, and the `messages` cookie is signed, not encrypted.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

ROOT_URLCONF = "nomyo_site.urls"
ASGI_APPLICATION = "nomyo_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

VAR_DIR.mkdir(exist_ok=True)
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the live page read while the recorder writes; the timeout rides out
    # short write contention instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # channels_redis blocks in BRPOP for up to 5 s; redis-py's default socket
            # timeout is about that long, so a quiet channel would end in TimeoutError.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "socket_connect_timeout": 5}],
                "capacity": 1000,
                "expiry": 10,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns about a missing one before collectstatic
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # works before (and without) collectstatic
# Files served at the site's root: /favicon.ico, which browsers ask for on pages without
# a <link rel="icon"> (the admin's).
WHITENOISE_ROOT = BASE_DIR / "static" / "root"
LOGIN_URL = "/admin/login/"

# Each proxied request writes one access-log line. No formatter here shows the caller's
# file and line, the thread, the process or its multiprocessing name, so records skip
# looking them up (the switches Python's logging documentation lists under
# "Optimization"); a format that shows them needs these back on.
logging._srcfile = None  # type: ignore[attr-defined]
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "filters": {"one_line": {"()": "nomyo_site.log_filters.ClientErrorsOnOneLine"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["one_line"]}
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        # httpx logs every upstream request at INFO; the router logs one line per request itself.
        "django.channels.server": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        # A 4xx of the pages is in the server's access line already; django.request adds
        # a line only for server errors. (django.security still reports refused requests.)
        "django.request": {"level": "ERROR"},
    },
}

# --- Router behaviour -------------------------------------------------------------
ROUTER_API_KEY = env("ROUTER_API_KEY", default="")
# Browser origins allowed to call the API (CORS), added to Ollama's defaults: see routing/server/cors.py.
ROUTER_ORIGINS = env.list("ROUTER_ORIGINS", default=[])
ROUTER_CONFIG = env("ROUTER_CONFIG", default="")
ROUTER_QUEUE_TIMEOUT = env.float("ROUTER_QUEUE_TIMEOUT", default=60.0)
ROUTER_QUEUE_MAX = env.int("ROUTER_QUEUE_MAX", default=1000)
# With a fallback chain: seconds a request waits for a slot on one model before trying the next
# (the last model of the chain waits what is left of ROUTER_QUEUE_TIMEOUT).
ROUTER_FALLBACK_WAIT = env.float("ROUTER_FALLBACK_WAIT", default=5.0)
# A queued request that waited this many seconds moves up one priority level (client keys: high, normal, low).
ROUTER_PRIORITY_AGING = env.float("ROUTER_PRIORITY_AGING", default=30.0)
ROUTER_MAX_BODY = env.int("ROUTER_MAX_BODY", default=64 * 1024 * 1024)
# Seconds a client may take to send a whole request body (from its headers); then 408 (slowloris).
ROUTER_BODY_TIMEOUT = env.float("ROUTER_BODY_TIMEOUT", default=60.0)
ROUTER_FLUSH_INTERVAL = env.float("ROUTER_FLUSH_INTERVAL", default=5.0)
# On SIGTERM/SIGINT: how long in-flight replies may take to finish before they are cut (s).
ROUTER_DRAIN_TIMEOUT = env.float("ROUTER_DRAIN_TIMEOUT", default=30.0)
ROUTER_MODELS_TTL = env.float("ROUTER_MODELS_TTL", default=300.0)
ROUTER_LOADED_TTL = env.float("ROUTER_LOADED_TTL", default=10.0)
# An endpoint whose circuit breaker is open is probed every ROUTER_FAILING_TTL / 4 s (at least 0.5 s).
ROUTER_FAILING_TTL = env.float("ROUTER_FAILING_TTL", default=10.0)
# Weak failures in a row (5xx replies, replies cut mid-way) that open an endpoint's breaker.
ROUTER_BREAKER_FAILURES = env.int("ROUTER_BREAKER_FAILURES", default=5)
# How old the in-memory endpoint list may get before it is re-read (changes made in this
# process, or announced over the channel layer, apply at once).
ROUTER_REGISTRY_RELOAD = env.float("ROUTER_REGISTRY_RELOAD", default=5.0)
ROUTER_MAX_RETRIES = env.int("ROUTER_MAX_RETRIES", default=2)
# A conversation a server refuses as longer than its context is trimmed (oldest non-system
# messages first) and sent once more; the context size is remembered per endpoint and model so
# later ones are trimmed before sending (routing/protocols/common/recovery.py). Off: the error goes back.
ROUTER_CONTEXT_TRIM = env.bool("ROUTER_CONTEXT_TRIM", default=True)
# A request with images that a model cannot see is sent once more without them.
ROUTER_IMAGE_RETRY = env.bool("ROUTER_IMAGE_RETRY", default=True)
# Prompt-cache affinity (routing/engine/affinity.py): a conversation's turns go back to the server
# that served it last; remembered ROUTER_AFFINITY_TTL seconds after last use, at most
# ROUTER_AFFINITY_MAX conversations; when that server is full, wait for it at most
# ROUTER_AFFINITY_WAIT seconds, then go to any free one.
ROUTER_AFFINITY = env.bool("ROUTER_AFFINITY", default=True)
ROUTER_AFFINITY_TTL = env.float("ROUTER_AFFINITY_TTL", default=1800.0)
ROUTER_AFFINITY_MAX = env.int("ROUTER_AFFINITY_MAX", default=100_000)
ROUTER_AFFINITY_WAIT = env.float("ROUTER_AFFINITY_WAIT", default=1.0)
# Upstream timeouts: connecting, the first byte (long: a model may be loading), the gap between chunks.
ROUTER_CONNECT_TIMEOUT = env.float("ROUTER_CONNECT_TIMEOUT", default=5.0)
ROUTER_FIRST_BYTE_TIMEOUT = env.float("ROUTER_FIRST_BYTE_TIMEOUT", default=300.0)
ROUTER_READ_TIMEOUT = env.float("ROUTER_READ_TIMEOUT", default=120.0)
ROUTER_PROBE_TIMEOUT = env.float("ROUTER_PROBE_TIMEOUT", default=5.0)
