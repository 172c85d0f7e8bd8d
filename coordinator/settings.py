"""Settings: every value reads an environment variable with a working development default.

A fresh clone runs on SQLite and an embedded Redis with no configuration. Production sets
DEBUG=False, SECRET_KEY, ALLOWED_HOSTS, DATABASE_URL and REDIS_URL (see README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from coordinator import embedded_redis

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {raw!r}") from None


def env_positive_int(name: str, default: int) -> int:
    value = env_int(name, default)
    if value < 1:
        raise ImproperlyConfigured(f"{name} must be 1 or more, not {value}")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", True)
_DEV_SECRET_KEY = "dev-only-insecure-key-never-use-in-production"
SECRET_KEY = env_str("SECRET_KEY", "" if not DEBUG else _DEV_SECRET_KEY)
if not DEBUG and (not SECRET_KEY or SECRET_KEY == _DEV_SECRET_KEY or len(SECRET_KEY) < 50):
    raise ImproperlyConfigured(
        "DEBUG is off, so SECRET_KEY must be set to a long random value (50+ characters), e.g. "
        "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# Where runtime state lives: the SQLite file, the embedded Redis, model versions and updates.
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var")))
STORAGE_DIR = Path(env_str("STORAGE_DIR", str(VAR_DIR / "storage")))

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "coordinator",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "coordinator.security.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "coordinator.urls"
WSGI_APPLICATION = "coordinator.wsgi.application"
ASGI_APPLICATION = "coordinator.asgi.application"

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
                "coordinator.access.navigation",
            ],
        },
    },
]

# Under ASGI every request runs in its own thread, so persistent connections (CONN_MAX_AGE > 0)
# pile up until PostgreSQL refuses more (seen at 100 agents); Django's advice is to disable them.
# A bounded pool per process takes their place: requests beyond it wait instead of failing.
DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"))}
DATABASES["default"]["CONN_MAX_AGE"] = 0
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int("DATABASE_POOL_SIZE", 10),
        "timeout": 30,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock when a transaction begins, so two launches that read the
    # same balances can never both write: SQLite's equivalent of SELECT ... FOR UPDATE.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"].setdefault("TEST", {})["NAME"] = str(VAR_DIR / "test-db.sqlite3")
    VAR_DIR.mkdir(parents=True, exist_ok=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "") or embedded_redis.ensure_running(VAR_DIR / "redis")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [REDIS_URL],
            "prefix": env_str("CHANNELS_PREFIX", "fl"),
            # Every socket of one web process shares one Redis queue, and channels_redis silently
            # drops what arrives while that queue holds `capacity` messages (100 by default): a
            # launch to 100 agents lost a push. Messages still expire after 60 s.
            "capacity": env_int("CHANNELS_CAPACITY", 10_000),
        },
    }
}

# The shared cache holds rate-limit counts (failed authentications, metrics requests), in Redis so
# that every web process sees the same ones; its serializer is JSON, as the default one unpickles.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"serializer": "coordinator.security.JsonCacheSerializer"},
    }
}

CELERY_BROKER_URL = embedded_redis.celery_url(REDIS_URL)
CELERY_RESULT_BACKEND = embedded_redis.celery_url(REDIS_URL)
# Messages and results are JSON only: a pickled message from whoever can write to Redis is refused.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 1800)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 1700)
CELERY_TASK_ROUTES = {"coordinator.tasks.round_aggregate_task": {"queue": "aggregation"}}
CELERY_TASK_DEFAULT_QUEUE = "celery"
# A redelivered task must come back soon after its worker died, not after Redis's default hour.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600)}
CELERY_BEAT_SCHEDULE = {
    "enforce-round-deadlines": {
        "task": "coordinator.tasks.rounds_enforce_deadlines_task",
        "schedule": float(env_int("DEADLINE_CHECK_SECONDS", 10)),
    },
    "requeue-stalled-aggregations": {
        "task": "coordinator.tasks.rounds_requeue_stalled_aggregations_task",
        "schedule": float(env_int("DEADLINE_CHECK_SECONDS", 10)),
    },
}

# A round aggregating for this long without a result has its aggregation queued again (by the
# deadline check): the queued message may have been lost with Redis, or never sent while it was
# down. Aggregation is idempotent, so a second run on a slow first one costs only time.
AGGREGATION_REQUEUE_SECONDS = env_int("AGGREGATION_REQUEUE_SECONDS", 300)

# Fault-injection for the exactly-once tests: seconds an aggregation pauses before storing.
AGGREGATION_PAUSE_SECONDS = float(env_int("AGGREGATION_PAUSE_SECONDS", 0))
AGGREGATION_DEVICE = env_str("AGGREGATION_DEVICE", "auto")
if AGGREGATION_DEVICE not in ("auto", "cpu", "cuda"):
    raise ImproperlyConfigured(f"AGGREGATION_DEVICE must be auto, cpu or cuda, not {AGGREGATION_DEVICE!r}")
MAX_UPDATE_BYTES = env_int("MAX_UPDATE_BYTES", 256 * 1024 * 1024)
# Any other request's body. Both limits are enforced while a body arrives (coordinator.body_limit).
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", 4 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = max(MAX_UPDATE_BYTES, MAX_REQUEST_BYTES)
# Live metrics: per agent socket, and per site over HTTP, this many messages a second on average
# and at most METRICS_BURST at once (coordinator.throttle).
METRICS_MESSAGES_PER_SECOND = env_int("METRICS_MESSAGES_PER_SECOND", 50)
METRICS_BURST = env_int("METRICS_BURST", 200)
# An agent not heard from for this long is shown offline.
SITE_ONLINE_SECONDS = env_int("SITE_ONLINE_SECONDS", 60)
# What an agent may say about itself (Site.agent_info, merged over heartbeats): at most this many
# top-level keys and this many bytes as JSON; a heartbeat past either is refused whole (413).
AGENT_INFO_MAX_KEYS = env_positive_int("AGENT_INFO_MAX_KEYS", 32)
AGENT_INFO_MAX_BYTES = env_positive_int("AGENT_INFO_MAX_BYTES", 16 * 1024)
# A site token rotated less than this long ago is not rotated again (409): of simultaneous
# rotations one wins, and the token it returned is the one that works.
TOKEN_ROTATION_INTERVAL_SECONDS = env_positive_int("TOKEN_ROTATION_INTERVAL_SECONDS", 10)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "coordinator.api.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "coordinator.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Federated BraTS coordinator API",
    "DESCRIPTION": "Federations, sites, privacy budgets, rounds, the privacy ledger, and the site agent's side.",
    "VERSION": "1",
    "ENUM_NAME_OVERRIDES": {"MechanismEnum": "coordinator.models.Mechanism"},
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
# Failed authentications allowed per window, counted in the shared cache (coordinator.ratelimit):
# past a limit, sign-in and bearer tokens are refused with 429 until the window ends.
SIGN_IN_FAILURES_PER_USERNAME = env_positive_int("SIGN_IN_FAILURES_PER_USERNAME", 10)
SIGN_IN_FAILURES_PER_IP = env_positive_int("SIGN_IN_FAILURES_PER_IP", 30)
SIGN_IN_FAILURE_WINDOW_SECONDS = env_positive_int("SIGN_IN_FAILURE_WINDOW_SECONDS", 300)
TOKEN_FAILURES_PER_IP = env_positive_int("TOKEN_FAILURES_PER_IP", 30)
TOKEN_FAILURE_WINDOW_SECONDS = env_positive_int("TOKEN_FAILURE_WINDOW_SECONDS", 60)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# No script reads the CSRF cookie: forms carry the token, and fetch() sends the form's field.
CSRF_COOKIE_HTTPONLY = True
if not DEBUG:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
