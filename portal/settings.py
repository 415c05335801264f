"""Berth settings: one module, every knob an environment variable.

Each ``BERTH_*`` variable has a default that runs as-is on one machine
(SQLite, in-memory channel layer, local vault under ``var/``). The table in
README.md lists them; keep the two in step.
"""
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from portal.audit_keys import AuditKeyError, AuditKeyring
from portal.secrets import ensure_private_dir, load_or_create

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name, default=None):
    return os.environ.get(f"BERTH_{name}", default)


def env_bool(name, default=False):
    value = env(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name, default):
    return _number(int, name, default)


def env_float(name, default):
    return _number(float, name, default)


def _number(kind, name, default):
    value = env(name, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"BERTH_{name} must be a number, not {value!r}") from None


def env_choice(name, default, choices):
    value = env(name, default)
    if value not in choices:
        raise ImproperlyConfigured(f"BERTH_{name} must be one of {', '.join(choices)}, "
                                   f"not {value!r}")
    return value


def env_list(name, default=""):
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


# --- where runtime state lives ------------------------------------------------
DATA_DIR = Path(env("DATA_DIR", BASE_DIR / "var")).resolve()
ensure_private_dir(DATA_DIR)
KEYS_DIR = DATA_DIR / "keys"

SECRET_KEY = env("SECRET_KEY") or load_or_create(KEYS_DIR / "secret_key", 50)
# The audit key is kept apart from SECRET_KEY and from the vault keyring: one
# leaked key must not let an attacker forge the audit trail. After the first
# `audit rotate-key` the keyring holds every version (portal/audit_keys.py);
# before it, the single key is version 1.
AUDIT_KEYRING = Path(env("AUDIT_KEYRING", str(KEYS_DIR / "audit-keyring.json")))
AUDIT_KEY = (env("AUDIT_KEY") or ("" if AUDIT_KEYRING.exists() else
                                  load_or_create(KEYS_DIR / "audit.key", 32))).encode()
try:  # an unreadable keyring would fail every audited request: stop at start-up
    AuditKeyring(AUDIT_KEYRING, AUDIT_KEY)
except AuditKeyError as exc:
    raise ImproperlyConfigured(str(exc)) from None
# Audit anchors (portal/audit_anchor.py): the chain's head, signed with an Ed25519
# key kept apart from the database and the audit key, written outside the database
# so a cut tail shows. The key is created on first use (0600).
AUDIT_ANCHOR_KEY = Path(env("AUDIT_ANCHOR_KEY", str(KEYS_DIR / "audit-anchor.key")))
# Append-only file of anchors ("" = none); syslog ("" = none, a socket path such as
# /dev/log, or host:port for UDP). With BERTH_VAULT_STORAGE=s3 each anchor is also an
# object in the vault's bucket.
AUDIT_ANCHOR_FILE = env("AUDIT_ANCHOR_FILE", str(DATA_DIR / "audit-anchors.jsonl"))
AUDIT_ANCHOR_SYSLOG = env("AUDIT_ANCHOR_SYSLOG", "")
# Each portal process anchors the head this often when it has moved (0 = never: run
# `manage.py audit anchor` from a timer instead).
AUDIT_ANCHOR_INTERVAL_SECONDS = env_int("AUDIT_ANCHOR_INTERVAL_SECONDS", 300)
# Refusals from one source (an address, a host) are aggregated over this interval: the
# first is a record at once, the rest one record with their count when it closes
# (portal/audit.py, record_refusal). Beyond MAX_SOURCES sources of one kind of refusal
# in an interval, the others share one window, so a flood from many addresses is
# bounded too.
AUDIT_REFUSAL_INTERVAL_SECONDS = env_int("AUDIT_REFUSAL_INTERVAL_SECONDS", 60)
AUDIT_REFUSAL_MAX_SOURCES = env_int("AUDIT_REFUSAL_MAX_SOURCES", 1000)

DEBUG = env_bool("DEBUG")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# --- applications -------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "knox",
    "guardian",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "channels",
    "portal",
    "vault",
    "migrator",
    "axes",  # sign-in lockout
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.middleware.SecurityHeadersMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: turns a locked-out sign-in into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"

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
                "portal.roles.role_context",
            ],
        },
    },
]

# --- database -----------------------------------------------------------------
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
    # One test database per test process, so two test runs on one server never collide.
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "berth.sqlite3",
            "OPTIONS": {
                # IMMEDIATE takes the write lock at BEGIN, so concurrent writers
                # queue on the busy timeout instead of failing mid-transaction.
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A file, not shared-cache memory: threads in tests need real locking.
            # One per test process, so two test runs never share a database.
            "TEST": {"NAME": str(DATA_DIR / f"test-berth-{os.getpid()}.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- channels -----------------------------------------------------------------
REDIS_URL = env("REDIS_URL")
# Every key Berth puts in Redis starts with this: deployments may share one Redis.
REDIS_PREFIX = env("REDIS_PREFIX", "berth")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 times socket reads out after 5 s by default: exactly the length of
            # channels-redis's blocking receive, which then crashes every consumer. Longer,
            # but not unbounded, so a dead connection is still noticed.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
                       "prefix": f"{REDIS_PREFIX}:asgi"},
        }
    }
else:
    # One process: in memory (see portal/channel_layer.py for why not Channels' own as is).
    CHANNEL_LAYERS = {"default": {"BACKEND": "portal.channel_layer.BatchExpiringChannelLayer"}}
# API rate-limit counters live in the cache: shared by every portal process via Redis.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": REDIS_URL, "KEY_PREFIX": REDIS_PREFIX}}

# --- authentication -----------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    # First, as django-axes requires: refuses a locked-out sign-in before any password check.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
     "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_AGE = env_int("SESSION_AGE_SECONDS", 8 * 3600)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

# Served over TLS (behind a terminating proxy or uvicorn --ssl-*): secure
# cookies and HSTS. Off by default because the demo serves plain loopback HTTP.
TLS = env_bool("TLS")
SESSION_COOKIE_SECURE = TLS
CSRF_COOKIE_SECURE = TLS
SECURE_SSL_REDIRECT = TLS and env_bool("SSL_REDIRECT", True)
SECURE_HSTS_SECONDS = env_int("HSTS_SECONDS", 31536000) if TLS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = TLS
SECURE_HSTS_PRELOAD = TLS
if env_bool("BEHIND_PROXY"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# Second factor (TOTP + backup codes). Admin actions need a verified second
# factor; BERTH_REQUIRE_2FA=0 relaxes that, for the demo only.
REQUIRE_2FA = env_bool("REQUIRE_2FA", True)
OTP_TOTP_ISSUER = "Berth"

# Sign-in lockout (django-axes): after BERTH_LOGIN_FAILURE_LIMIT failed sign-ins for
# one username, or from one address, the next failure locks that username (or that
# address) out for BERTH_LOGIN_COOLOFF_MINUTES; meanwhile even the right password is
# refused. Attempts during a lockout do not extend it. Counts are in the database.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5)
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT + 1  # axes locks at the failure that reaches it
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # username OR address
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = False  # a success from an address must not clear its failures
AXES_CLIENT_IP_CALLABLE = "portal.audit.client_ip"  # the address the audit trail records
AXES_LOCKOUT_CALLABLE = "portal.views.auth.locked_out"
AXES_DISABLE_ACCESS_LOG = True  # sign-ins are in the audit trail already
AXES_ENABLE_ADMIN = False
AXES_VERBOSE = False  # no start-up banner on every manage.py command

# Roles are groups; see portal/roles.py.
ROLE_ADMINS = "admins"
ROLE_AUDITORS = "auditors"

# API tokens: knox with our own model, which carries scopes (portal.models).
KNOX_TOKEN_MODEL = "portal.APIToken"
# knox's own migrations create its (swapped-out, unused) token table with a foreign key
# to users; PostgreSQL then refuses the flush between tests. Nothing uses that table.
MIGRATION_MODULES = {"knox": None}
REST_KNOX = {
    "TOKEN_TTL": timedelta(days=env_int("TOKEN_TTL_DAYS", 30)),
    "TOKEN_PREFIX": "berth_",
    "AUTH_HEADER_PREFIX": "Token",
}

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header turns anonymous refusals into 401.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.authentication.ScopedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
        # Host agents stream one job's image with a single-use credential.
        "migrator.credentials.JobCredentialAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Over the rate: 429 with Retry-After (portal/throttling.py). Anonymous callers are
    # counted per address (REMOTE_ADDR: X-Forwarded-For is never trusted here).
    "DEFAULT_THROTTLE_CLASSES": ["portal.throttling.AnonThrottle",
                                 "portal.throttling.UserThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env("API_RATE_ANON", "60/min"),
        "user": env("API_RATE_USER", "1200/min"),
        "token-issue": env("API_RATE_TOKEN_ISSUE", "30/hour"),
    },
    "NUM_PROXIES": 0,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "portal.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Berth API",
    "DESCRIPTION": "Save, restore and live-migrate guests through an encrypted image vault. "
                   "Authenticate with `Authorization: Token <token>` (scoped, expiring).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the sidecar package: served locally, nothing from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "portal.api.schema.add_streaming_endpoints",
        "portal.api.schema.declare_error_responses",
    ],
}

# --- vault --------------------------------------------------------------------
VAULT_DIR = Path(env("VAULT_DIR", DATA_DIR / "vault")).resolve()
# The keyring (master keys) lives apart from the vault: back it up separately.
VAULT_KEYRING = Path(env("VAULT_KEYRING", KEYS_DIR / "vault-keyring.json")).resolve()
# When set, a JSON keyring in this environment variable is used instead (read-only).
VAULT_KEYRING_ENV = env("VAULT_KEYRING_ENV")
VAULT_ALGORITHM = env_choice("VAULT_ALGORITHM", "aes-256-gcm", ("aes-256-gcm", "chacha20-poly1305"))
VAULT_CHUNK_MIB = env_int("VAULT_CHUNK_MIB", 1)
VAULT_COMPRESS = env_bool("VAULT_COMPRESS")
VAULT_MAX_IMAGE_BYTES = env_int("VAULT_MAX_IMAGE_GIB", 64) * 1024**3
VAULT_ADMINS_HOLD_ALL = env_bool("VAULT_ADMINS_HOLD_ALL", True)
# Seconds an unreferenced object must have existed before start-up cleanup
# removes it: another portal process may be committing it right now.
VAULT_ORPHAN_GRACE_SECONDS = env_int("VAULT_ORPHAN_GRACE_SECONDS", 3600)
# Where image objects live: "local" (VAULT_DIR) or "s3" (an S3-compatible
# bucket several portal machines can share). S3 credentials come from boto3's
# own chain (AWS_ACCESS_KEY_ID..., instance role), never from these settings.
VAULT_STORAGE = env_choice("VAULT_STORAGE", "local", ("local", "s3"))
VAULT_S3_BUCKET = env("VAULT_S3_BUCKET", "")
if VAULT_STORAGE == "s3" and not VAULT_S3_BUCKET:
    raise ImproperlyConfigured("BERTH_VAULT_STORAGE=s3 needs BERTH_VAULT_S3_BUCKET")
VAULT_S3_PREFIX = env("VAULT_S3_PREFIX", "")
VAULT_S3_ENDPOINT = env("VAULT_S3_ENDPOINT", "")
VAULT_S3_REGION = env("VAULT_S3_REGION", "")

# --- hosts and jobs -------------------------------------------------------------
PKI_DIR = Path(env("PKI_DIR", DATA_DIR / "pki")).resolve()
AGENTS_DIR = Path(env("AGENTS_DIR", DATA_DIR / "agents")).resolve()
# The URL agents use to reach this portal (written into their config bundles).
PORTAL_URL = env("PORTAL_URL", "http://127.0.0.1:8000")
# A running job whose agent has been silent this long is failed, with the reason.
JOB_AGENT_TIMEOUT_SECONDS = env_int("JOB_AGENT_TIMEOUT_SECONDS", 60)
# A queued job a connected agent has not started by then is failed: its command was lost.
JOB_START_TIMEOUT_SECONDS = env_int("JOB_START_TIMEOUT_SECONDS", 60)
# A connected agent silent this long (three of its 10 s heartbeats) is shown unresponsive
# and gets no new jobs:
# its socket is open, but it has stopped talking (frozen, overloaded, half-dead link).
HOST_UNRESPONSIVE_SECONDS = env_int("HOST_UNRESPONSIVE_SECONDS", 30)
# Refused /ws/agent/ handshakes from one address per AUDIT_REFUSAL_INTERVAL_SECONDS; beyond,
# the address is refused without its credential being looked at until the interval ends.
AGENT_CONNECT_FAILURE_LIMIT = env_int("AGENT_CONNECT_FAILURE_LIMIT", 10)

# Live migration stop conditions (Xen's spirit: 30 rounds, 3x memory), per
# migration overridable.
MIGRATION_DOWNTIME_MS = env_int("MIGRATION_DOWNTIME_MS", 300)
MIGRATION_MAX_ROUNDS = env_int("MIGRATION_MAX_ROUNDS", 30)
MIGRATION_MAX_DATA_FACTOR = env_float("MIGRATION_MAX_DATA_FACTOR", "3.0")
MIGRATION_AUTO_CONVERGE = env_bool("MIGRATION_AUTO_CONVERGE", True)
# Pre-copy runs at most this long, then stops and copies (stop reason max_time).
MIGRATION_MAX_SECONDS = env_int("MIGRATION_MAX_SECONDS", 600)
# The commit check (docs/relocation-protocol.md, section 5): sampled | incremental | full.
MIGRATION_VERIFY = env_choice("MIGRATION_VERIFY", "sampled", ("sampled", "incremental", "full"))
# The bandwidth cap of a live migration, MB/s (10**6 bytes/s) on the wire; 0: none.
# Per migration: max_bandwidth_mbps, 1..100000 (migrator.migration.MAX_BANDWIDTH_MBPS).
MIGRATION_MAX_BANDWIDTH_MBPS = env_int("MIGRATION_MAX_BANDWIDTH_MBPS", 0)
if not 0 <= MIGRATION_MAX_BANDWIDTH_MBPS <= 100_000:
    raise ImproperlyConfigured("BERTH_MIGRATION_MAX_BANDWIDTH_MBPS must be 0 (no cap) to "
                               f"100000 MB/s, not {MIGRATION_MAX_BANDWIDTH_MBPS}")

# --- static files -------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns on every start otherwise
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from the source tree when collectstatic has not run (tests).
WHITENOISE_USE_FINDERS = True

# --- i18n ---------------------------------------------------------------------
LANGUAGE_CODE = "en-gb"
TIME_ZONE = env("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

# --- logging ------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    "loggers": {"django.request": {"level": "ERROR"},
                # Every sign-in is an audit record: keep only axes' warnings (failures, lockouts).
                "axes": {"level": "WARNING"}},
}
