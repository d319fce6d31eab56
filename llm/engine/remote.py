"""Engines whose model runs in another process: the same contract as `BaseEngine`, no model here.

A web process configured with a remote backend (`worker`: a dedicated inference worker reached
through the channel layer; `openai`: an OpenAI-compatible server such as vLLM) keeps no weights
and no decode thread. Its engine turns `submit()` into a message to the remote side and the
remote side's answer back into the events a local `Request` yields (Token..., then Done), so the
websocket consumer, the REST views and /v1/chat/completions work unchanged:

    request = engine.submit(history, on_event=...)   # raises EngineBusy / InputTooLong like a local engine
    request.adapter                                   # the version that answers, as the remote side bound it
    request.cancel()                                  # the remote side stops generating

A subclass implements `_start(request, payload)` (send it; block until the remote side accepted
or refused) and `_cancel(request)`; it calls `request._feed(text)` and `request._end(stats)` as
events arrive. What stays here: the option checks and clamps (the server's caps hold on this side
too), the watchdog that ends a request whose remote side went silent, and the metrics.
"""

import asyncio
import logging
import threading
import time

from llm.engine.base import CURRENT, BaseEngine, Request
from llm.engine.events import CANCELLED, ERROR, Done, EngineClosed, Stats, Token
from llm.engine.prompts import Prompt, as_turns

logger = logging.getLogger(__name__)

# A request that got no event from its remote side for this long beyond max_seconds ends with an
# error instead of hanging its client (the remote process died, or the network dropped).
SILENCE_GRACE_SECONDS = 10.0


class RemoteRequest(Request):
    """A Request answered elsewhere: `_feed`/`_end` are called as the remote side's events arrive."""

    def __init__(self, engine, *, max_new_tokens, temperature, top_p, seed, on_event):
        super().__init__(
            Prompt(text="", ids=[], dropped_turns=0), None,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, on_event=on_event,
        )
        self._engine = engine
        self._lock = threading.Lock()
        self.last_event = time.monotonic()
        self.remote = {}  # what the remote side said about it (its id, the worker that serves it)

    def _accepted(self, adapter, *, prompt_tokens=0, dropped_turns=0):
        self.adapter = self.stats.adapter = adapter
        self.stats.prompt_tokens, self.stats.dropped_turns = prompt_tokens, dropped_turns
        self.last_event = time.monotonic()

    def _feed(self, text):
        with self._lock:
            if self.done:
                return
            self.last_event = time.monotonic()
            if self.stats.first_token_ms is None:
                self.stats.first_token_ms = (self.last_event - self._created) * 1000
        if text:
            self._deliver(Token(text))

    def _end(self, stats=None, *, reason=None, error=None):
        """Finish once (later calls are ignored): with the remote side's Stats, or a local reason."""
        with self._lock:
            if self.done:
                return
            self._done.set()
        if stats is not None:
            stats.request_id = self.id
            self.stats = stats
        else:
            self.stats.finish_reason, self.stats.error = reason, error
            self.stats.latency_ms = (time.monotonic() - self._created) * 1000
        self._engine._forget(self)
        self._deliver(Done(self.stats))

    def cancel(self):
        if self.cancelled or self.done:
            return
        super().cancel()
        try:
            self._engine._cancel(self)
        except Exception:  # the remote side is gone: it stops on its own cap
            logger.warning("could not cancel remote request %s", self.id, exc_info=True)
        # The remote side confirms with its Done; if it never does, end here after a short wait.
        timer = threading.Timer(2.0, self._end, kwargs={"reason": CANCELLED})
        timer.daemon = True
        timer.start()


class RemoteEngine(BaseEngine):
    """The contract of `BaseEngine` for a model served elsewhere (subclasses say where)."""

    remote = True

    def __init__(self, config):
        super().__init__(config)
        self._inflight = {}  # request id -> RemoteRequest
        self._watchdog = None
        self.dtype_reason = "served by a remote process"

    # -- what a subclass provides

    def _connect(self):
        """Make the connection ready (called once by load())."""

    def _start(self, request, payload):
        """Send `payload` for `request`; block until accepted (call request._accepted) or raise the
        refusal (EngineBusy, InputTooLong, EngineClosed, EngineError)."""
        raise NotImplementedError

    def _cancel(self, request):
        raise NotImplementedError

    def _disconnect(self):
        """Close the connection (called once by close())."""

    # -- the contract

    def load(self):
        if self._loaded:
            return
        with self._load_lock:
            if self._loaded:
                return
            self._connect()
            self._watchdog = threading.Thread(target=self._watch, name=f"{self.backend}-watchdog", daemon=True)
            self._watchdog.start()
            self._loaded = True

    def close(self, timeout=10):
        with self._state:
            self._closed = True
            inflight = list(self._inflight.values())
        for request in inflight:
            request._end(reason=CANCELLED)
        if self._loaded:
            self._disconnect()

    def set_adapter(self, name, path=None):
        """The remote side serves its own active version; this records what new requests ask for."""
        self._current = name

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
        max_new_tokens, temperature, top_p = self._limits(max_new_tokens, temperature, top_p)
        turns = as_turns(history)
        request = RemoteRequest(
            self, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, on_event=on_event
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
        with self._state:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._inflight[request.id] = request
        try:
            self._start(request, payload)
        except BaseException:
            self._forget(request)
            raise

    def _forget(self, request):
        with self._state:
            self._inflight.pop(request.id, None)

    def _watch(self):
        """End requests whose remote side has been silent for longer than any answer may take."""
        limit = self.config.max_seconds + SILENCE_GRACE_SECONDS
        while not self._closed:
            time.sleep(1.0)
            now = time.monotonic()
            with self._state:
                silent = [r for r in self._inflight.values() if now - r.last_event > limit]
            for request in silent:
                logger.error("remote request %s: no event for %.0f s; ending it", request.id, limit)
                request._end(reason=ERROR, error=f"the {self.backend} backend stopped answering")

    def metrics(self):
        with self._state:
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
            "current_adapter": self._current,
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
