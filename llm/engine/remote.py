"""Engines whose model runs in another process: the Engine protocol, no model here.

A web process configured with a remote backend (`worker`: a dedicated inference worker reached
through the channel layer; `openai`: an OpenAI-compatible server such as vLLM) keeps no weights
and no decode thread. Its engine turns `submit()` into a message to the remote side and the
remote side's answer back into the events a `Request` yields (Token..., then Done), so the
websocket consumer, the REST views and /v1/chat/completions work unchanged:

    request = engine.submit(history, on_event=...)   # raises EngineBusy / InputTooLong like a local engine
    request.adapter                                   # the version that answers, as the remote side bound it
    request.cancel()                                  # the remote side stops generating

A subclass implements `_start(request, payload)` (send it; block until the remote side accepted
or refused) and `_cancel(request)`; it calls `request.accepted(...)`, `request.feed(text)` and
`request.end(stats)` as events arrive. What stays here: the option checks and clamps (the
server's caps hold on this side too), the watchdog that ends a request whose remote side went
silent, and the metrics. Nothing here is shared with the local engines' decode loop.
"""

import asyncio
import logging
import threading
import time

from llm.engine.adapters import CURRENT
from llm.engine.config import clamp_limits
from llm.engine.events import CANCELLED, ERROR, EngineClosed, Stats
from llm.engine.prompts import as_turns
from llm.engine.protocol import DerivedCalls
from llm.engine.request import Request

logger = logging.getLogger(__name__)

# A request that got no event from its remote side for this long beyond max_seconds ends with an
# error instead of hanging its client (the remote process died, or the network dropped).
SILENCE_GRACE_SECONDS = 10.0
# How long a cancelled request waits for its remote side's Done before it ends here.
CANCEL_GRACE_SECONDS = 2.0


class RemoteRequest(Request):
    """A Request answered elsewhere: `accepted`, `feed` and `end` are called as the remote side's
    events arrive; `cancel` tells the remote side (through `on_cancel`)."""

    def __init__(self, *, on_cancel, on_end, **options):
        super().__init__(adapter=None, **options)
        self._on_cancel = on_cancel
        self._on_end = on_end
        self._lock = threading.Lock()
        self.last_event = self.clock()
        self.remote = {}  # what the remote side said about it (its id, the worker that serves it)

    def accepted(self, adapter, *, prompt_tokens=0, dropped_turns=0):
        self.adapter = self.stats.adapter = adapter
        self.stats.prompt_tokens, self.stats.dropped_turns = prompt_tokens, dropped_turns
        self.last_event = self.clock()

    def feed(self, text):
        with self._lock:
            if self.done:
                return
            self.last_event = self.clock()
            if self.stats.first_token_ms is None:
                self.stats.first_token_ms = (self.last_event - self.created) * 1000
        self.emit(text)

    def end(self, stats=None, *, reason=None, error=None):
        """Finish once (later calls are ignored): with the remote side's Stats, or a local reason."""
        if self.done:
            return
        if stats is not None:
            stats.request_id = self.id
        else:
            stats = self.stats
            stats.finish_reason, stats.error = reason, error
            stats.latency_ms = (self.clock() - self.created) * 1000
        self._on_end(self)
        self.finish(stats)

    def cancel(self):
        if self.cancelled or self.done:
            return
        super().cancel()
        try:
            self._on_cancel(self)
        except Exception:  # the remote side is gone: it stops on its own cap
            logger.warning("could not cancel remote request %s", self.id, exc_info=True)
        # The remote side confirms with its Done; if it never does, end here after a short wait.
        timer = threading.Timer(CANCEL_GRACE_SECONDS, self.end, kwargs={"reason": CANCELLED})
        timer.daemon = True
        timer.start()


class RemoteEngine(DerivedCalls):
    """The Engine protocol for a model served elsewhere (subclasses say where)."""

    backend = ""
    remote = True
    supports_choices = False  # free text only: the pick among retrieved pairs is skipped
    follows_active = False  # True: chat.serving tells it the active version's name (set_adapter)

    def __init__(self, config):
        self.config = config
        self.backend_reason = ""
        self.device = self.dtype = None
        self.dtype_reason = "served by a remote process"
        self.requests_finished = 0
        self.current_adapter = None  # what new requests ask for; the remote side may keep its own
        self._loaded = False
        self._closed = False
        self._lock = threading.Lock()
        self._inflight = {}  # request id -> RemoteRequest
        self._watchdog = None

    # -- what a subclass provides

    def _connect(self):
        """Make the connection ready (called once by load())."""

    def _start(self, request, payload):
        """Send `payload` for `request`; block until accepted (call request.accepted) or raise the
        refusal (EngineBusy, InputTooLong, EngineClosed, EngineError)."""
        raise NotImplementedError

    def _cancel(self, request):
        raise NotImplementedError

    def _disconnect(self):
        """Close the connection (called once by close())."""

    # -- the protocol

    @property
    def loaded(self):
        return self._loaded

    @property
    def loaded_adapters(self):
        return []

    def load(self):
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._connect()
            self._watchdog = threading.Thread(target=self._watch, name=f"{self.backend}-watchdog", daemon=True)
            self._watchdog.start()
            self._loaded = True

    async def aload(self):
        await asyncio.to_thread(self.load)

    def close(self, timeout=10):
        with self._lock:
            self._closed = True
            inflight = list(self._inflight.values())
        for request in inflight:
            request.end(reason=CANCELLED)
        if self._loaded:
            self._disconnect()

    def set_adapter(self, name, path=None):
        """The remote side serves its own active version; this records what new requests ask for."""
        self.current_adapter = name

    def busy_now(self):
        return None  # the remote side says so when asked

    def check_room(self):
        if self._closed:
            raise EngineClosed("the engine is closed")

    def submit(self, history, **options):
        request, payload = self._prepare(history, **options)
        self._send(request, payload)
        return request

    async def asubmit(self, history, **options):
        """`submit` for async code: the request is made on this loop (its events come here), the
        round trip to the remote side runs in a thread."""
        request, payload = self._prepare(history, **options)
        await asyncio.to_thread(self._send, request, payload)
        return request

    def _prepare(
        self, history, *, system=None, max_new_tokens=None, temperature=None, top_p=None, seed=None, on_event=None,
        adapter=CURRENT, adapter_path=None,
    ):
        max_new_tokens, temperature, top_p = clamp_limits(self.config, max_new_tokens, temperature, top_p)
        turns = as_turns(history)
        request = RemoteRequest(
            on_cancel=self._cancel, on_end=self._forget,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, on_event=on_event,
        )
        payload = {
            "history": [[turn.role, turn.text] for turn in turns],
            "system": system,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "pinned": adapter is not CURRENT,
            "adapter": None if adapter is CURRENT else adapter,
            "adapter_path": str(adapter_path) if adapter_path else None,
        }
        return request, payload

    def _send(self, request, payload):
        self.load()
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._inflight[request.id] = request
        try:
            self._start(request, payload)
        except BaseException:
            self._forget(request)
            raise

    def _forget(self, request):
        with self._lock:
            self._inflight.pop(request.id, None)

    def _inflight_request(self, request_id):
        with self._lock:
            return self._inflight.get(request_id)

    def _watch(self):
        """End requests whose remote side has been silent for longer than any answer may take."""
        limit = self.config.max_seconds + SILENCE_GRACE_SECONDS
        while not self._closed:
            time.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                silent = [r for r in self._inflight.values() if now - r.last_event > limit]
            for request in silent:
                logger.error("remote request %s: no event for %.0f s; ending it", request.id, limit)
                request.end(reason=ERROR, error=f"the {self.backend} backend stopped answering")

    def metrics(self):
        with self._lock:
            inflight = len(self._inflight)
        return {
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "loaded": self.loaded,
            "device": None,
            "dtype": None,
            "dtype_reason": self.dtype_reason,
            "running": inflight,
            "waiting": 0,
            "max_active": self.config.max_active,
            "max_waiting": self.config.max_waiting,
            "current_adapter": self.current_adapter,
            "loaded_adapters": [],
            "decode_steps": 0,
            "max_batch_seen": 0,
            "requests_finished": self.requests_finished,
            "latency_ema_s": None,
        }


def stats_from(data, request):
    """Stats from a remote side's dict (unknown keys ignored: the two sides may differ in version)."""
    known = {name: data[name] for name in Stats.__dataclass_fields__ if name in data}
    known["request_id"] = request.id
    known.setdefault("adapter", request.adapter)
    return Stats(**known)
