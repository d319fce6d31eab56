"""The process's inference engine, configured from settings and kept on the active adapter.

One engine per process, created on first use (never at import: migrate, tests and the q2
cluster don't pay for it), on the backend CSP_INFERENCE_BACKEND chooses (see
`llm.engine.backends`). Before each new answer `active_engine()` checks which adapter version
is active and hot-swaps it in, so an activation reaches new chats at their next message, while
answers already streaming finish on the version they started with.

The state lives in one `EngineHolder` (`holder`); the module's functions are thin calls on it,
for the transports, the admin and the tests. Its clock is injectable: a test that needs the
active-version check to be due moves the clock or polls, it does not sleep past the constant.
"""

import threading
import time

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from chat.inference.client import WorkerEngine
from llm.engine import BackendUnavailable, EngineConfig, make_engine
from training.models import AdapterVersion

# How stale the active-version check may be: activation reaches new chats within this.
ACTIVE_CHECK_SECONDS = 0.5


def engine_config():
    return EngineConfig(
        base_dir=str(settings.CSP_BASE_MODEL),
        device=settings.CSP_CHAT_DEVICE,
        dtype=settings.CSP_CHAT_DTYPE,
        trust_remote_code=settings.CSP_TRUST_REMOTE_CODE,
        system_prompt=settings.CSP_CHAT_SYSTEM_PROMPT,
        canaries=tuple(settings.CSP_CHAT_CANARIES),
        max_input_tokens=settings.CSP_CHAT_MAX_INPUT_TOKENS,
        max_new_tokens=settings.CSP_CHAT_MAX_NEW_TOKENS,
        max_seconds=settings.CSP_CHAT_MAX_SECONDS,
        max_active=settings.CSP_CHAT_MAX_ACTIVE,
        max_waiting=settings.CSP_CHAT_MAX_WAITING,
        threads=settings.CSP_CHAT_THREADS,
        draft_tokens=settings.CSP_DRAFT_TOKENS,
        extra_buffers=settings.CSP_LLAMA_EXTRA_BUFFERS,
        head_type=settings.CSP_LLAMA_HEAD_TYPE,
        remote_url=settings.CSP_OPENAI_BASE_URL,
        remote_api_key=settings.CSP_OPENAI_API_KEY,
        remote_base_model=settings.CSP_OPENAI_BASE_MODEL,
    )


def active_version():
    """(name, path) of the active adapter version, or (None, None): the base model."""
    active = AdapterVersion.objects.filter(is_active=True).values_list("name", "path").first()
    return active if active else (None, None)


class EngineHolder:
    """This process's engine: made on first use, switched to the active version, reset on demand."""

    def __init__(self, *, clock=time.monotonic, check_seconds=ACTIVE_CHECK_SECONDS):
        self.clock = clock
        self.check_seconds = check_seconds
        self._lock = threading.Lock()
        self._engine = None
        self._checked_at = None  # when the active version was last looked up (None: never)
        self._backend = None  # the backend this process serves on, when not CSP_INFERENCE_BACKEND (the inference worker)

    @property
    def engine(self):
        """The engine if one was made, else None (makes nothing)."""
        return self._engine

    def serve_locally(self, backend):
        if backend in ("worker", "openai"):
            raise ImproperlyConfigured(f"an inference worker serves its own model: --backend {backend} is not one")
        self.reset()
        self._backend = backend

    def get(self):
        with self._lock:
            if self._engine is None:
                backend = self._backend or settings.CSP_INFERENCE_BACKEND
                try:
                    self._engine = make_engine(engine_config(), backend, worker_class=WorkerEngine)
                except BackendUnavailable as error:
                    raise ImproperlyConfigured(f"CSP_INFERENCE_BACKEND={backend}: {error}") from error
            return self._engine

    def active(self):
        engine = self.get()
        if engine.remote and not getattr(engine, "follows_active", False):
            return engine  # the remote side keeps itself on the active version
        # Local engines hot-swap the version; one that follows_active (an OpenAI-compatible server
        # serves every version by name) only records which name new requests ask for.
        now = self.clock()
        if self._checked_at is None or now - self._checked_at >= self.check_seconds:
            name, path = active_version()
            if engine.current_adapter != name:
                engine.set_adapter(name, path)
            self._checked_at = now
        return engine

    def busy_now(self):
        engine = self._engine
        return engine.busy_now() if engine is not None and engine.loaded else None

    def reset(self):
        with self._lock:
            engine, self._engine, self._checked_at = self._engine, None, None
        if engine is not None:
            engine.close()

    def status(self):
        engine = self._engine
        if engine is None:
            return None
        metrics = engine.metrics()
        return {
            "loaded": engine.loaded,
            "backend": engine.backend,
            "backend_reason": engine.backend_reason,
            "dtype": metrics["dtype"] if engine.loaded else "",
            "dtype_reason": engine.dtype_reason if engine.loaded else "",
            "adapter": engine.current_adapter,
            "metrics": metrics,
        }


holder = EngineHolder()


def serve_locally(backend):
    """Make this process's engine a local one on `backend` (the inference worker: it is where
    CSP_INFERENCE_BACKEND=worker sends requests, so it must not send them on)."""
    holder.serve_locally(backend)


def get_engine():
    return holder.get()


def active_engine():
    """The engine, switched to the active adapter version if that changed (sync: call in a thread)."""
    return holder.active()


def busy_now():
    """The engine's EngineBusy if it is loaded here and full right now, else None (no waiting,
    no database: for the websocket consumer to refuse a flood of messages cheaply)."""
    return holder.busy_now()


def reset_engine():
    """Close and forget the engine (tests, and a base model change)."""
    holder.reset()


def engine_status():
    """What this process serves with, for the admin: None when no engine was made yet."""
    return holder.status()
