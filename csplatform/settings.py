"""csplatform settings: one file, driven by environment variables.

Every value has a default that runs the embedded single-machine setup (SQLite, ORM broker,
in-memory channel layer). Production sets SECRET_KEY, DEBUG=false, ALLOWED_HOSTS,
CSP_HTTPS=true and usually DATABASE_URL / REDIS_URL; see README.md "Configuration".

This is the only module that reads os.environ. A bad value fails at start-up with
ImproperlyConfigured naming the variable.
"""

import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlparse

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

BASE_DIR = Path(__file__).resolve().parent.parent


def envstr(name, default):
    return os.environ.get(name, default)


def envbool(name, default):
    raw = os.environ.get(name, default).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean; use true or false.")


def envint(name, default, *, minimum=None):
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}.")
    return value


def envfloat(name, default, *, minimum):
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number.") from None
    if not value >= minimum or value == float("inf"):  # also NaN
        raise ImproperlyConfigured(f"{name}={raw} must be a number of at least {minimum}.")
    return value


def envlist(name, default):
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# An origin as a browser sends it: scheme, host, optional port, nothing else (no path, no "/").
ORIGIN_PATTERN = re.compile(r"https?://(?:[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")


def envorigins(name, default):
    """A comma-separated list of web origins (https://shop.example.com, http://127.0.0.1:8080),
    lower-cased. Checked strictly because they are written into a Content-Security-Policy header:
    a path, a wildcard or a stray quote would widen or break it."""
    origins = [origin.lower() for origin in envlist(name, default)]
    for origin in origins:
        match = ORIGIN_PATTERN.fullmatch(origin)
        if match is None or int(match["port"] or 0) > 65535:
            raise ImproperlyConfigured(
                f"{name} entry {origin!r} is not an origin like https://shop.example.com or http://host:8080 (scheme, host, port; no path)."
            )
    return origins


def envrate(name, default):
    """A DRF throttle rate such as "60/min"; checked here so a typo fails at start-up."""
    raw = os.environ.get(name, default).strip()
    count, _sep, period = raw.partition("/")
    if not count.isdecimal() or not period or period[0] not in "smhd":
        raise ImproperlyConfigured(f"{name}={raw!r} is not a rate like 60/min or 1000/day.")
    return raw


DEBUG = envbool("DEBUG", "false")

# Runtime state (SQLite file, generated secret key, models, snapshots, adapters) lives here.
DATA_DIR = Path(envstr("CSP_DATA_DIR", str(BASE_DIR / "var"))).resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(f"CSP_DATA_DIR={str(DATA_DIR)!r} cannot be created: {exc}") from None


def _generated_secret_key():
    # A fresh checkout needs no configuration: generate a key once and keep it with the data,
    # so sessions survive restarts. Production passes SECRET_KEY instead.
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = os.environ.get("SECRET_KEY") or _generated_secret_key()
if len(SECRET_KEY) < 50:
    raise ImproperlyConfigured("SECRET_KEY must be at least 50 random characters long.")

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "")
for _origin in CSRF_TRUSTED_ORIGINS:
    if not _origin.startswith(("http://", "https://")):
        raise ImproperlyConfigured(
            f"CSRF_TRUSTED_ORIGINS entry {_origin!r} must start with http:// or https://."
        )

INSTALLED_APPS = [
    "daphne",  # first, so that runserver serves ASGI (websockets) too
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_q",
    "knowledge",
    "training",
    "chat",
    "csplatform",  # management commands: bootstrap, serve
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "csplatform.urls"
ASGI_APPLICATION = "csplatform.asgi.application"
WSGI_APPLICATION = "csplatform.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: SQLite file by default, anything dj-database-url understands otherwise ---
_default_db_url = f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
DATABASE_URL = envstr("DATABASE_URL", _default_db_url)
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a usable database URL: {exc}") from None
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The q2 worker and the web server write the same file: wait for the lock, don't fail.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    # A file, not :memory:, so tests can run a real q2 cluster in a subprocess against it.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-db-{os.getpid()}.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: optional; switches the channel layer, the q2 broker and the cache ---
REDIS_URL = envstr("REDIS_URL", "")
if REDIS_URL and urlparse(REDIS_URL).scheme not in ("redis", "rediss", "unix"):
    raise ImproperlyConfigured(f"REDIS_URL={REDIS_URL!r} must start with redis://, rediss:// or unix://.")


def channel_layer_host(url):
    """channels-redis's connection to `url`. Its receive blocks on Redis for 5 s (BZPOPMIN), and
    redis-py 8 gives up reading a reply after 5 s by default: the two race, and a consumer that
    waits 5 s for a message dies with TimeoutError. The read timeout must be longer."""
    return {"address": url, "socket_timeout": 30}


if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # The key prefix: deployments (or test runs) sharing one Redis keep their channels apart.
            "CONFIG": {"hosts": [channel_layer_host(REDIS_URL)], "prefix": envstr("CSP_CHANNEL_PREFIX", "asgi")},
        }
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Training ---
# The base checkpoint adapters are trained on: a local Hugging Face directory, never a hub id.
# `manage.py prepare_base_model` puts the embedded Gemma-3-270M here.
CSP_BASE_MODEL = Path(envstr("CSP_BASE_MODEL", str(DATA_DIR / "models" / "gemma-3-270m"))).resolve()
CSP_TRUST_REMOTE_CODE = envbool("CSP_TRUST_REMOTE_CODE", "false")  # only for models like ChatGLM3
CSP_TRAINING_DEVICE = envstr("CSP_TRAINING_DEVICE", "auto")
# How much nicer (0-19) a training run's threads are than the worker's: chats on the same cores
# come first (training.priority); 0 leaves the priority alone.
CSP_TRAINING_NICE = envint("CSP_TRAINING_NICE", 10, minimum=0)
if CSP_TRAINING_NICE > 19:
    raise ImproperlyConfigured(f"CSP_TRAINING_NICE={CSP_TRAINING_NICE} must be from 0 to 19.")
CSP_TRAINING_QUANTIZATION = envstr("CSP_TRAINING_QUANTIZATION", "none")
if CSP_TRAINING_QUANTIZATION not in ("none", "4bit"):
    raise ImproperlyConfigured(f"CSP_TRAINING_QUANTIZATION={CSP_TRAINING_QUANTIZATION!r} must be none or 4bit.")
CSP_HEARTBEAT_SECONDS = envint("CSP_HEARTBEAT_SECONDS", 10, minimum=1)
# A running run whose worker sent no heartbeat for this long is marked failed.
CSP_HEARTBEAT_TIMEOUT = envint("CSP_HEARTBEAT_TIMEOUT", 3 * CSP_HEARTBEAT_SECONDS, minimum=2)
CSP_CHECKPOINT_EVERY = envint("CSP_CHECKPOINT_EVERY", 50, minimum=0)
# Also checkpoint after this many seconds of training (and at each epoch's end), so that a killed run
# loses at most this much however few steps it has. A Gemma-3-270M LoRA checkpoint (r=8, with the
# optimizer state) is 23 MB and takes 0.2 s to save on 2 CPU cores: 0.2% of the time at 120 s.
CSP_CHECKPOINT_SECONDS = envint("CSP_CHECKPOINT_SECONDS", 120, minimum=0)
CSP_EVAL_MAX_PAIRS = envint("CSP_EVAL_MAX_PAIRS", 30, minimum=0)
CSP_EVAL_MAX_NEW_TOKENS = envint("CSP_EVAL_MAX_NEW_TOKENS", 160, minimum=8)
# Activating a version whose evaluation is worse than the active one: warn, or refuse.
CSP_EVAL_GATE = envstr("CSP_EVAL_GATE", "warn")
if CSP_EVAL_GATE not in ("warn", "strict"):
    raise ImproperlyConfigured(f"CSP_EVAL_GATE={CSP_EVAL_GATE!r} must be warn or strict.")
# RAFT (llm.finetune.raft): train on each question with the pairs retrieved for it, so the adapter
# answers from references; in CSP_RAFT_NO_GOLD_SHARE of the examples the right pair is left out and
# the target is "no answer in the references". CSP_RAFT_VARIANTS more questions per pair: its
# alternates first, then paraphrase-like rewrites.
CSP_RAFT = envbool("CSP_RAFT", "true")
try:
    CSP_RAFT_NO_GOLD_SHARE = float(envstr("CSP_RAFT_NO_GOLD_SHARE", "0.25"))
except ValueError:
    raise ImproperlyConfigured(f"CSP_RAFT_NO_GOLD_SHARE={os.environ['CSP_RAFT_NO_GOLD_SHARE']!r} is not a number.") from None
if not 0.0 <= CSP_RAFT_NO_GOLD_SHARE < 1.0:
    raise ImproperlyConfigured(f"CSP_RAFT_NO_GOLD_SHARE={CSP_RAFT_NO_GOLD_SHARE} must be at least 0 and below 1.")
CSP_RAFT_VARIANTS = envint("CSP_RAFT_VARIANTS", 2, minimum=0)  # questions per pair besides its own
# Questions the sample knowledge base does not cover: each run calibrates its fallback threshold
# on them and reports how it answers them (never trained on).
CSP_OUT_OF_SCOPE_DATA = BASE_DIR / "data" / "out_of_scope.json"
# Paraphrases of the training pairs and out-of-scope questions that the answer-mode thresholds are
# fitted on, so the dev split and CSP_OUT_OF_SCOPE_DATA stay for measuring. Used when at least 10
# of its paraphrases ask the run's training pairs; else a run calibrates on its dev split.
CSP_CALIBRATION_DATA = Path(os.environ["CSP_CALIBRATION_DATA"]) if os.environ.get("CSP_CALIBRATION_DATA") else BASE_DIR / "data" / "calibration.json"

# --- Chat serving (every client-supplied value is capped by these) ---
# auto: llama.cpp on a CPU-only host when the base model has a GGUF (and llama-cpp-python is
# installed), else transformers. The admin's adapter-versions page says which serves and why.
# worker: this process keeps no model; a dedicated `manage.py inference_worker` answers through the
# channel layer (needs REDIS_URL). openai: an external OpenAI-compatible server (vLLM) answers.
CSP_INFERENCE_BACKEND = envstr("CSP_INFERENCE_BACKEND", "auto")
if CSP_INFERENCE_BACKEND not in ("auto", "transformers", "llamacpp", "worker", "openai"):
    raise ImproperlyConfigured(
        f"CSP_INFERENCE_BACKEND={CSP_INFERENCE_BACKEND!r} must be auto, transformers, llamacpp, worker or openai."
    )
if CSP_INFERENCE_BACKEND == "worker" and not REDIS_URL:
    raise ImproperlyConfigured("CSP_INFERENCE_BACKEND=worker needs REDIS_URL: web processes reach the worker through Redis.")
# The channel inference workers take requests from, and how long a web process waits for one to accept.
CSP_INFERENCE_CHANNEL = envstr("CSP_INFERENCE_CHANNEL", "csp.inference")
CSP_INFERENCE_WAIT_SECONDS = envint("CSP_INFERENCE_WAIT_SECONDS", 10, minimum=1)
# CSP_INFERENCE_BACKEND=openai: the server's base URL (ending in /v1), its key, and the model name
# it serves the base model under; adapter versions are asked for by their names ("v3").
CSP_OPENAI_BASE_URL = envstr("CSP_OPENAI_BASE_URL", "")
CSP_OPENAI_API_KEY = envstr("CSP_OPENAI_API_KEY", "")
CSP_OPENAI_BASE_MODEL = envstr("CSP_OPENAI_BASE_MODEL", "base")
if CSP_INFERENCE_BACKEND == "openai" and urlparse(CSP_OPENAI_BASE_URL).scheme not in ("http", "https"):
    raise ImproperlyConfigured("CSP_INFERENCE_BACKEND=openai needs CSP_OPENAI_BASE_URL=http(s)://host:port/v1.")
CSP_CHAT_SYSTEM_PROMPT = envstr("CSP_CHAT_SYSTEM_PROMPT", "")
# Secrets no answer may print (comma-separated, 6+ letters or digits each), besides the system
# prompt in use: an answer about to repeat one ends with finish reason "filtered" (llm.engine.guard).
CSP_CHAT_CANARIES = envlist("CSP_CHAT_CANARIES", "")
CSP_CHAT_DEVICE = envstr("CSP_CHAT_DEVICE", "auto")
CSP_CHAT_DTYPE = envstr("CSP_CHAT_DTYPE", "auto")
# llama.cpp compute threads; 0 = one per core. On a host shared with other busy processes fewer
# threads decode faster (llama.cpp's threads spin while they wait for each other).
CSP_CHAT_THREADS = envint("CSP_CHAT_THREADS", 0, minimum=0)
# Prompt-lookup drafting (llm.engine.drafting): a greedy answer's next tokens are guessed from the
# retrieved answers and the conversation in its prompt, and up to this many are checked in the same
# forward as its next token (the answer is the same; copying ones come faster). 0 turns it off.
CSP_DRAFT_TOKENS = envint("CSP_DRAFT_TOKENS", 8, minimum=0)
# llama.cpp's extra weight buffers (AMX tiles, repacked layouts): auto = on unless the CPU advertises
# AMX (some virtual machines fault on AMX instructions they advertise: llm.engine.config).
CSP_LLAMA_EXTRA_BUFFERS = envstr("CSP_LLAMA_EXTRA_BUFFERS", "auto")
if CSP_LLAMA_EXTRA_BUFFERS not in ("auto", "on", "off"):
    raise ImproperlyConfigured(f"CSP_LLAMA_EXTRA_BUFFERS={CSP_LLAMA_EXTRA_BUFFERS!r} must be auto, on or off.")
# llama.cpp's output layer: "" = the GGUF as shipped; a ggml type (llm.engine.config.HEAD_TYPES) =
# serve a copy with the output layer requantised to it, made once beside the GGUF. Faster in the
# bare model (benchmarks/batch_shapes.py), little in the engine with a LoRA version active, and
# greedy answers change: off unless chosen after measuring (benchmarks/README.md).
CSP_LLAMA_HEAD_TYPE = envstr("CSP_LLAMA_HEAD_TYPE", "")
if CSP_LLAMA_HEAD_TYPE not in ("", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
    raise ImproperlyConfigured(
        f"CSP_LLAMA_HEAD_TYPE={CSP_LLAMA_HEAD_TYPE!r} must be empty (the GGUF as shipped) or one of q4_0, q4_1, q5_0, q5_1, q8_0."
    )
CSP_CHAT_MAX_ACTIVE = envint("CSP_CHAT_MAX_ACTIVE", 8, minimum=1)  # answers decoded together
CSP_CHAT_MAX_WAITING = envint("CSP_CHAT_MAX_WAITING", 32, minimum=0)  # beyond: busy / HTTP 429
CSP_CHAT_MAX_INPUT_TOKENS = envint("CSP_CHAT_MAX_INPUT_TOKENS", 1024, minimum=16)
CSP_CHAT_MAX_NEW_TOKENS = envint("CSP_CHAT_MAX_NEW_TOKENS", 256, minimum=1)
CSP_CHAT_MAX_SECONDS = envint("CSP_CHAT_MAX_SECONDS", 60, minimum=1)
# An answer's text so far is saved this often while it streams (one UPDATE per interval, not per
# token): a web process killed mid-answer loses at most this much of it (chat.answering).
CSP_ANSWER_SAVE_SECONDS = envfloat("CSP_ANSWER_SAVE_SECONDS", 2, minimum=0.1)
CSP_CHAT_MAX_MESSAGE_CHARS = envint("CSP_CHAT_MAX_MESSAGE_CHARS", 2000, minimum=1)
CSP_CHAT_HISTORY_MESSAGES = envint("CSP_CHAT_HISTORY_MESSAGES", 20, minimum=1)
# Per websocket connection: at most this many frames in 10 seconds; past twice that it is closed.
CSP_CHAT_FRAMES_PER_10S = envint("CSP_CHAT_FRAMES_PER_10S", 20, minimum=1)
# A websocket frame longer than this closes the socket (4009: applications may not send 1009 through
# daphne, which closes with 1009 itself past 1 MiB); a long message gets an error frame.
CSP_WS_MAX_FRAME_BYTES = envint("CSP_WS_MAX_FRAME_BYTES", 256 * 1024, minimum=1024)
# daphne pings a websocket idle this many seconds and drops it when no pong comes within the
# timeout: dead peers and vanished tabs stop holding a socket (and their answer) open.
CSP_WS_PING_INTERVAL = envint("CSP_WS_PING_INTERVAL", 20, minimum=1)
CSP_WS_PING_TIMEOUT = envint("CSP_WS_PING_TIMEOUT", 30, minimum=1)
# Grounded answers (chat.grounding, llm.grounding): every answer comes from the approved Q&A.
# Off: the engine answers every message on its own, as before grounding (not recommended).
CSP_GROUNDING = envbool("CSP_GROUNDING", "true")
CSP_GROUNDING_K = envint("CSP_GROUNDING_K", 3, minimum=1)  # pairs retrieved into a grounded prompt
# Between the thresholds the active version writes an answer from the retrieved pairs (grounded).
# Off: such a question gets the fallback reply with the close questions offered ("did you mean",
# CSP_CHAT_SUGGESTIONS): nothing generated, so no answer copies the wrong pair's text.
CSP_GROUNDED_GENERATION = envbool("CSP_GROUNDED_GENERATION", "true")

# The adapter's rerank (llm.grounding.choose): RAFT training also teaches the adapter to name which
# of the top CSP_GROUNDING_K pairs asks what the customer asks; serving asks a version trained so
# before it generates, and a pick at least CSP_RERANK_MIN_PROB likely answers with that pair's
# curated text (a sure "none": the fallback reply).
CSP_RERANK = envbool("CSP_RERANK", "true")
if CSP_RERANK and CSP_GROUNDING_K > 9:
    raise ImproperlyConfigured(f"CSP_GROUNDING_K={CSP_GROUNDING_K} must be at most 9 with CSP_RERANK (one digit names a pair).")


OR_OFF = " or 'off'"


def envscore(name, *, maximum=1.0, off=False):
    """An optional number from 0 to `maximum`, such as a retrieval score (empty: None, the default;
    with off=True, "off" is kept as the string "off")."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if off and raw.lower() == "off":
        return "off"
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number{OR_OFF if off else ''}.") from None
    if not 0.0 <= value <= maximum:
        raise ImproperlyConfigured(f"{name}={value} must be between 0 and {maximum:g}.")
    return value


# Override the thresholds each training run calibrates (the version page shows them): a top
# match at or above CSP_CURATED_THRESHOLD gets its curated answer verbatim, one below
# CSP_FALLBACK_THRESHOLD the fallback reply.
# Unset (None): each version's pick bar, calibrated by its run on the calibration set (the lowest
# probability at which its picks were right for >= 99%; none: its picks decide nothing), or 0.5 for
# versions calibrated before (llm.calibration.pick_min_prob).
CSP_RERANK_MIN_PROB = envscore("CSP_RERANK_MIN_PROB")
CSP_CURATED_THRESHOLD = envscore("CSP_CURATED_THRESHOLD")
CSP_FALLBACK_THRESHOLD = envscore("CSP_FALLBACK_THRESHOLD")
if None not in (CSP_CURATED_THRESHOLD, CSP_FALLBACK_THRESHOLD) and CSP_FALLBACK_THRESHOLD > CSP_CURATED_THRESHOLD:
    raise ImproperlyConfigured(
        f"CSP_FALLBACK_THRESHOLD={CSP_FALLBACK_THRESHOLD} must not be above CSP_CURATED_THRESHOLD={CSP_CURATED_THRESHOLD}."
    )
# Between the two thresholds, a match whose confidence (its score plus twice its lead over the next
# pair's score: llm.grounding.confidence, 0..3) reaches this bar gets its curated answer too.
# Unset: each version's bar, calibrated by its run like the curated threshold (versions calibrated
# before it: none); "off": no match between the thresholds is curated by its confidence.
CSP_CONFIDENT_THRESHOLD = envscore("CSP_CONFIDENT_THRESHOLD", maximum=3.0, off=True)
# What the assistant says when the knowledge base has no answer (empty: a built-in text in the
# page's language, offering a person).
CSP_FALLBACK_REPLY = envstr("CSP_FALLBACK_REPLY", "")
# Show customers the curated question each answer came from, under the answer.
CSP_CHAT_SHOW_SOURCES = envbool("CSP_CHAT_SHOW_SOURCES", "false")
# With the fallback reply, offer the customer up to this many curated questions that came close
# ("did you mean"; asking one gets its curated answer); 0 offers none.
CSP_CHAT_SUGGESTIONS = envint("CSP_CHAT_SUGGESTIONS", 3, minimum=0)
# A customer message containing one of these (case-insensitive) asks for a person: the
# conversation waits for an agent instead of getting an answer from the assistant.
CSP_HANDOFF_KEYWORDS = envlist("CSP_HANDOFF_KEYWORDS", "人工,human agent,real person,talk to a human")

# --- django-q2: training runs are long, so timeout > longest run and retry > timeout,
# with one attempt: a killed worker must not make q2 redeliver the run (django-q2 #327).
CSP_TRAINING_TIMEOUT = envint("CSP_TRAINING_TIMEOUT", 6 * 3600, minimum=60)
Q_CLUSTER = {
    "name": "csplatform",
    "workers": envint("CSP_QCLUSTER_WORKERS", 1, minimum=1),
    "timeout": CSP_TRAINING_TIMEOUT,
    # Seconds before q2 hands an unacknowledged task out again. Tests set it below a run's length
    # to prove a redelivered run is not trained twice (the task claims its run first).
    "retry": envint("CSP_QCLUSTER_RETRY", CSP_TRAINING_TIMEOUT + 1800, minimum=1),
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 500,
    "label": _("Task queue"),
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

# --- Auth ---
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "admin:login"
# `make run` creates this superuser once; without a password one is generated and printed once.
CSP_ADMIN_USER = envstr("CSP_ADMIN_USER", "admin")
CSP_ADMIN_PASSWORD = envstr("CSP_ADMIN_PASSWORD", "")

# `make run` / `manage.py serve`: where daphne listens.
CSP_HOST = envstr("CSP_HOST", "127.0.0.1")
CSP_PORT = envint("CSP_PORT", 8000, minimum=1)
CSP_SAMPLE_DATA = [BASE_DIR / "data" / "train.json", BASE_DIR / "data" / "dev.json"]

# --- i18n: Simplified Chinese first, English second ---
LANGUAGE_CODE = envstr("CSP_LANGUAGE", "zh-hans")
LANGUAGES = [("zh-hans", "简体中文"), ("en", "English")]
if LANGUAGE_CODE not in dict(LANGUAGES):
    raise ImproperlyConfigured(f"CSP_LANGUAGE={LANGUAGE_CODE!r} must be one of: zh-hans, en.")
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = envstr("TIME_ZONE", "Asia/Shanghai")
USE_I18N = True
USE_TZ = True

# --- Static files: served by the ASGI app itself (see asgi.py); a proxy may serve STATIC_ROOT ---
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"

# --- Request size limits: an oversized body is refused, never buffered ---
DATA_UPLOAD_MAX_MEMORY_SIZE = envint("CSP_MAX_BODY_BYTES", 2 * 1024 * 1024, minimum=1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = DATA_UPLOAD_MAX_MEMORY_SIZE
CSP_IMPORT_MAX_BYTES = envint("CSP_IMPORT_MAX_BYTES", 10 * 1024 * 1024, minimum=1024)
CSP_IMPORT_MAX_ROWS = envint("CSP_IMPORT_MAX_ROWS", 20000, minimum=1)

# --- Security: CSP_HTTPS=true turns on everything `check --deploy` asks for behind TLS ---
CSP_HTTPS = envbool("CSP_HTTPS", "false")
SECURE_SSL_REDIRECT = CSP_HTTPS
SESSION_COOKIE_SECURE = CSP_HTTPS
CSRF_COOKIE_SECURE = CSP_HTTPS
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31536000 if CSP_HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", "true")
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", "true")
CSP_BEHIND_PROXY = envbool("CSP_BEHIND_PROXY", "false")
if CSP_BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Admin login: this many failed logins for one username from one client address within the
# window, and the login form refuses to check passwords for that pair until the window has passed.
CSP_LOGIN_MAX_FAILURES = envint("CSP_LOGIN_MAX_FAILURES", 5, minimum=1)
CSP_LOGIN_WINDOW_SECONDS = envint("CSP_LOGIN_WINDOW_SECONDS", 300, minimum=1)
# Wider locks, set higher so that an attacker's failures lock neither the real admin logging in
# from the same (office, NAT) address nor the account everywhere at the pair's limit: failures
# from one address whatever the username, and for one username whatever the address.
CSP_LOGIN_MAX_FAILURES_PER_ADDRESS = envint(
    "CSP_LOGIN_MAX_FAILURES_PER_ADDRESS", 5 * CSP_LOGIN_MAX_FAILURES, minimum=CSP_LOGIN_MAX_FAILURES
)
CSP_LOGIN_MAX_FAILURES_PER_USERNAME = envint(
    "CSP_LOGIN_MAX_FAILURES_PER_USERNAME", 5 * CSP_LOGIN_MAX_FAILURES, minimum=CSP_LOGIN_MAX_FAILURES
)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Sites that may show the chat widget (/widget/, docs/widget.md) in a frame, besides the platform
# itself; every other page keeps X_FRAME_OPTIONS.
CSP_WIDGET_ORIGINS = envorigins("CSP_WIDGET_ORIGINS", "")
# Days a widget's token (chat/widget.py) holds after it was signed; each visit within them renews
# it for the same conversations. After them the frame starts afresh with a new, empty conversation.
CSP_WIDGET_TOKEN_DAYS = envint("CSP_WIDGET_TOKEN_DAYS", 30, minimum=1)
SESSION_COOKIE_HTTPONLY = True

# --- REST API ---
CSP_API_THROTTLE_RATES = {
    "anon": envrate("CSP_API_THROTTLE_ANON", "30/min"),
    "user": envrate("CSP_API_THROTTLE_USER", "600/min"),
}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": [
        "csplatform.throttling.AnonThrottle",
        "csplatform.throttling.UserThrottle",
    ],
    "DEFAULT_PAGINATION_CLASS": "csplatform.pagination.CappedPageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    # DRF's JSONParser lets a body nested 1 000 deep raise RecursionError (a 500).
    "DEFAULT_PARSER_CLASSES": ["csplatform.parsers.DepthLimitedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_SCHEMA_CLASS": "csplatform.api_schema.ApiSchema",
    "EXCEPTION_HANDLER": "csplatform.api_errors.exception_handler",
}
CSP_API_MAX_PAGE_SIZE = envint("CSP_API_MAX_PAGE_SIZE", 200, minimum=1)
SPECTACULAR_SETTINGS = {
    "TITLE": "csplatform API",
    "DESCRIPTION": "Curate customer-service Q&A, train adapters and chat with them.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "QAPairStatusEnum": "knowledge.models.QAPair.Status",
        "TrainingRunStatusEnum": "training.models.TrainingRun.Status",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": envstr("CSP_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
