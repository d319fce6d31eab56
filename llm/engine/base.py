"""What every inference backend shares: requests, admission, limits, adapters, the decode loop.

    engine = Engine(EngineConfig(base_dir="var/models/base"))     # or LlamaCppEngine: the same contract
    engine.set_adapter("v3", "var/adapters/v3/adapter")            # new requests answer with v3
    text, stats = engine.generate([Turn("user", "如何退货？")])      # sync (tests, REST)
    async for event in engine.stream(history):                     # async
        ...  # Token(text) ... then Done(stats)

    request = await engine.asubmit(history, max_new_tokens=128)    # a consumer that needs the handle:
    request.adapter                                                # for its "start" frame
    async for event in request: ...                                # request.cancel() on disconnect

How it runs. `submit()` renders and tokenises the prompt in the caller's thread (the one renderer
training uses, with the checkpoint's Hugging Face tokenizer), refuses what it must (EngineBusy
beyond K running + Q waiting, InputTooLong), binds the request to the adapter that is current at
that moment (a reference is held until it finishes), and appends it to the waiting queue. A
single background thread loops; each iteration it admits waiting requests while fewer than K
run, ends the cancelled and timed-out ones, deletes adapters that are neither current nor used,
and runs one backend step: prefill of newcomers (at most `prefill_chunk` prompt tokens in all)
and one decode of every running sequence (continuous batching: sequences join and leave between
steps). Generated ids go through `_accept`, which streams their text or finishes the request.

Events reach the caller through an asyncio queue (`loop.call_soon_threadsafe`) when the request
was submitted from an event loop, and through `on_event` (called on the decode thread: keep it
short) when one is given. A backend subclass provides `_load_model`, `_step`, `_has_rows`,
`_rows`, `_clear_rows`, `_free_slot` and the adapter weights' load and unload. Nothing here imports
Django or torch.
"""

import asyncio
import collections
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from llm.engine.config import EngineConfig
from llm.engine.events import (
    CANCELLED,
    ERROR,
    FILTERED,
    LENGTH,
    STOP,
    TIMEOUT,
    Done,
    EngineBusy,
    EngineClosed,
    Stats,
    Token,
)
from llm.engine.guard import LeakGuard
from llm.engine.prompts import fit_conversation

logger = logging.getLogger(__name__)

CURRENT = object()  # submit(adapter=CURRENT): the adapter new requests get now (the default)


@dataclass
class _Adapter:
    path: Path
    system_prompt: str | None  # what it was trained with (finetune_config.json), if recorded
    refs: int = 0  # requests bound to it that have not finished
    loaded: bool = False  # its weights are in the backend


class Request:
    """One answer being generated: a handle to cancel it, iterate its events, or wait for it."""

    def __init__(self, prompt, adapter, *, max_new_tokens, temperature, top_p, seed, on_event):
        self.id = uuid.uuid4().hex[:12]
        self.prompt = prompt
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.stats = Stats(
            request_id=self.id, adapter=adapter, prompt_tokens=len(prompt.ids), dropped_turns=prompt.dropped_turns
        )
        self._created = time.monotonic()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._on_event = on_event
        self._pieces = []
        try:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
        except RuntimeError:  # submitted from a plain thread: result() and on_event only
            self._loop = self._queue = None
        # decode state, touched by the decode thread only
        self._phase = "waiting"  # -> "running" -> "done"
        self._stream = None  # TextStream
        self._slot = None  # the backend's per-sequence state (a KV cache while prefilling, a sequence id)
        self._prefilled = 0  # prompt tokens already in the KV cache
        self._position = 0  # tokens in the KV cache = position of the next input token
        self._last = None  # last generated token: the next step's input
        self._generated = 0
        self._generator = None  # the seeded sampling generator, when sampling
        self._guard = None  # LeakGuard over the system prompt used and the canaries, when on

    def cancel(self):
        """Stop generating: takes effect at the next step boundary (the current step's token is dropped)."""
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    @property
    def done(self):
        return self._done.is_set()

    @property
    def text(self):
        """The text streamed so far (all of it once done)."""
        return "".join(self._pieces)

    @property
    def token_ids(self):
        """The ids generated so far, the stop token not counted: what the model said before the
        text stream and the leak guard (empty for an answer generated in another process)."""
        return list(self._stream.ids) if self._stream is not None else []

    def result(self, timeout=None):
        """Block until done; returns (text, stats). Not from an event loop: iterate instead."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        return self.text, self.stats

    def __aiter__(self):
        if self._queue is None:
            raise RuntimeError("this request was submitted outside an event loop; use result() or on_event")
        return self._events()

    async def _events(self):
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Done):
                return

    def _deliver(self, event):
        if isinstance(event, Token):
            self._pieces.append(event.text)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("on_event of request %s raised; cancelling it", self.id)
                self.cancel()
        if self._queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self.cancel()


class BaseEngine:
    backend = ""  # "transformers" or "llamacpp": the metrics and the admin say which one serves
    adapter_file = "adapter_config.json"  # what an adapter directory must hold for this backend
    adapter_hint = ""  # how to make that file when it is missing

    def __init__(self, config: EngineConfig):
        self.config = config
        self.backend_reason = ""  # why this backend serves; set by whoever chose it
        # Filled by load(); constructing an engine loads nothing.
        self.device = self.dtype = self.dtype_reason = None
        self.tokenizer = None
        self._loaded = False
        self._stop_ids = frozenset()
        self._prompt_budget = config.max_input_tokens
        self._sampling = None  # llm.engine.sampling, imported by load() (it imports torch)
        self._thread = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.RLock()  # a forward, or an adapter load/delete; taken before _state
        self._state = threading.Condition()  # queue, counters, adapter table; held briefly
        self._waiting = collections.deque()
        self._prefilling = []
        self._running = 0  # prefilling + decoding (the K in K + Q)
        self._adapters = {}  # name -> _Adapter
        self._current = None  # adapter name for new requests; None = base model
        self._garbage = set()  # adapter names to delete on the decode thread when unused
        self._closed = False
        self._latency_ema = None
        # counters that tests and the metrics page read
        self.decode_steps = 0
        self.max_batch_seen = 0  # most sequences advanced by one forward (one batch)
        self.requests_finished = 0

    # -----------------------------------------------------------------------------------------
    # loading

    @property
    def loaded(self):
        return self._loaded

    def load(self):
        """Load the base model (once; later calls return at once) and start the decode thread."""
        if self._loaded:
            return
        with self._load_lock:
            if self._loaded:
                return
            if self._closed:
                raise EngineClosed("the engine is closed")
            from llm.engine import sampling

            self._sampling = sampling
            self._load_model()
            with self._model_lock:
                self._loaded = True
                with self._state:
                    current = self._current
                if current is not None:
                    self._load_adapter_weights(current)
            self._thread = threading.Thread(target=self._run, name=f"chat-engine-{self.backend}", daemon=True)
            self._thread.start()
            logger.info(
                "%s engine loaded %s on %s as %s (%s)",
                self.backend, self.config.base_dir, self.device, self._dtype_name(), self.dtype_reason,
            )

    def _use_tokenizer(self, tokenizer, max_positions):
        """Take the checkpoint's tokenizer and the model's positions: stop ids and the prompt budget."""
        from llm.finetune import stop_token_ids

        budget = self.config.max_input_tokens
        if max_positions:
            budget = min(budget, max_positions - self.config.max_new_tokens)
        if budget < 1:
            raise ValueError(
                f"max_new_tokens={self.config.max_new_tokens} leaves no room for a prompt in this model's "
                f"{max_positions} positions"
            )
        self.tokenizer = tokenizer
        self._stop_ids = frozenset(stop_token_ids(tokenizer))
        self._prompt_budget = budget

    def _dtype_name(self):
        return str(self.dtype).removeprefix("torch.") if self.dtype else None

    async def aload(self):
        await asyncio.to_thread(self.load)

    def close(self, timeout=10):
        """Stop the decode thread; unfinished requests end as "cancelled". The engine takes no more."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -----------------------------------------------------------------------------------------
    # adapters

    def _read_adapter(self, path):
        path = Path(path)
        if not (path / self.adapter_file).is_file():
            raise FileNotFoundError(f"no adapter in {str(path)!r} ({self.adapter_file} is missing{self.adapter_hint})")
        saved = path / "finetune_config.json"
        system = json.loads(saved.read_text(encoding="utf-8")).get("system_prompt") if saved.is_file() else None
        return _Adapter(path=path.resolve(), system_prompt=system)

    def set_adapter(self, name, path=None):
        """Serve new requests with adapter `name` (loaded from `path` the first time); None = base model.

        Requests already submitted finish on the adapter they started with; the previous adapter
        is deleted once none of them uses it. Loading waits for the current decode step (the
        model is not changed under a running forward); from async code use
        `await asyncio.to_thread(engine.set_adapter, ...)`.
        """
        adapter = None
        if name is not None:
            with self._state:
                known = self._adapters.get(name)
            if known is None:
                if path is None:
                    raise ValueError(f"adapter {name!r} is not loaded; give its path")
                adapter = self._read_adapter(path)
            elif path is not None and Path(path).resolve() != known.path:
                raise ValueError(f"adapter {name!r} is already loaded from {str(known.path)!r}; versions are immutable")
        with self._model_lock:
            with self._state:
                if name is not None and name not in self._adapters:
                    self._adapters[name] = adapter
                previous, self._current = self._current, name
                self._garbage.discard(name)
                if previous is not None and previous != name:
                    self._garbage.add(previous)
            if name is not None and self._loaded:
                try:
                    self._load_adapter_weights(name)
                except Exception:
                    with self._state:  # leave the engine as it was
                        self._current = previous
                        self._garbage.discard(previous)
                        self._adapters.pop(name, None)
                    raise
            if not self._loaded:
                self._collect_garbage()  # nothing loaded: just forget the unused entries
        self._wake()

    def _collect_garbage(self):
        """Delete adapters that are not current and that no request uses any more."""
        with self._model_lock, self._state:
            unused = [n for n in self._garbage if n != self._current and self._adapters[n].refs == 0]
            for name in unused:
                self._garbage.discard(name)
                adapter = self._adapters.pop(name)
                if adapter.loaded:
                    self._unload_adapter_weights(name)
                    logger.info("adapter %s deleted", name)

    @property
    def current_adapter(self):
        return self._current

    @property
    def loaded_adapters(self):
        with self._state:
            return sorted(name for name, adapter in self._adapters.items() if adapter.loaded)

    # -----------------------------------------------------------------------------------------
    # requests

    def render(self, history, system=None):
        """The Prompt (text, ids, dropped_turns) that answering `history` would use now."""
        self.load()
        with self._state:
            system = self._system_for(self._current, system)
        return self._render(history, system)

    def _render(self, history, system):
        return fit_conversation(
            self.tokenizer,
            history,
            system=system,
            max_tokens=self._prompt_budget,
            max_message_chars=self.config.max_message_chars,
        )

    def _system_for(self, adapter, system):
        """Under _state: the caller's system prompt, else the adapter's training one, else the config's."""
        if system is not None:
            return system
        trained = self._adapters[adapter].system_prompt if adapter is not None else None
        return trained if trained is not None else self.config.system_prompt

    def _limits(self, max_new_tokens, temperature, top_p):
        """Clamp the client's limits to the server's caps."""
        config = self.config
        max_new_tokens = config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        temperature = config.temperature if temperature is None else float(temperature)
        top_p = config.top_p if top_p is None else float(top_p)
        if math.isnan(temperature) or math.isnan(top_p) or top_p <= 0:
            raise ValueError(f"temperature must be a number and top_p in (0, 1]; got {temperature}, {top_p}")
        return (
            min(max_new_tokens, config.max_new_tokens),
            min(max(temperature, 0.0), config.max_temperature),
            min(top_p, 1.0),
        )

    def _busy(self):
        """Under _state: EngineBusy when K run and Q wait, else None."""
        if self._running + len(self._waiting) < self.config.max_active + self.config.max_waiting:
            return None
        # About one answer's time frees a slot: the recent average latency, at least a second.
        return EngineBusy(retry_after=max(1, math.ceil(self._latency_ema or 1.0)))

    def submit(
        self, history, *, system=None, max_new_tokens=None, temperature=None, top_p=None, seed=None, on_event=None,
        adapter=CURRENT, adapter_path=None,
    ):
        """Queue an answer to `history` (Turns ending with the user's message, or one string).

        `adapter` pins the answer to one adapter (a name; `adapter_path` where the engine has not
        loaded it yet; None = the base model) instead of the current one. A pinned adapter is
        loaded for the request and unloaded after it, unless it is current by then.

        Raises EngineBusy (never waits for room), InputTooLong, EngineClosed, ValueError,
        FileNotFoundError (no adapter at adapter_path). Loads the model on first use (blocking:
        async callers use `asubmit` or `stream`). Returns a Request.
        """
        limits = self._limits(max_new_tokens, temperature, top_p)
        self.load()
        self.check_room()
        adapter = self._bind(adapter, adapter_path)  # a reference held until the request finishes
        return self._enqueue(history, adapter, system, limits, seed, on_event)

    def busy_now(self):
        """EngineBusy when K run and Q wait at this moment, else None, read without waiting for a
        lock: for a caller on an event loop that wants to refuse before any other work. Advisory
        (a request may finish meanwhile); `submit` checks again under the lock."""
        return self._busy()

    def check_room(self):
        """Raise EngineClosed or EngineBusy now if `submit` would: callers with work to do before
        submitting (storing the question) refuse first, cheaply."""
        with self._state:
            self._refuse_if_full()

    def _refuse_if_full(self):
        """Under _state: EngineClosed when closed, EngineBusy when K run and Q wait."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        busy = self._busy()
        if busy:
            raise busy

    def _enqueue(self, history, adapter, system, limits, seed, on_event):
        """Render, make the Request and queue it; the adapter's reference is released on failure."""
        max_new_tokens, temperature, top_p = limits
        try:
            with self._state:
                system = self._system_for(adapter, system)
            prompt = self._render(history, system)
            request = Request(
                prompt, adapter,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, on_event=on_event,
            )
            if self.config.guard_min_run:
                request._guard = LeakGuard([system, *self.config.canaries], min_run=self.config.guard_min_run)
            with self._state:
                self._refuse_if_full()  # again: others may have queued while this one rendered
                self._waiting.append(request)
                self._state.notify_all()
        except BaseException:
            self._release(adapter)
            raise
        return request

    def _bind(self, adapter, path):
        """The adapter name a new request answers with, with a reference taken on it."""
        if adapter is CURRENT:
            with self._state:
                name = self._current
                if name is not None:
                    self._adapters[name].refs += 1
            return name
        if adapter is None:
            return None
        with self._state:
            entry = self._adapters.get(adapter)
            if entry is not None and path is not None and Path(path).resolve() != entry.path:
                raise ValueError(f"adapter {adapter!r} is already loaded from {str(entry.path)!r}; versions are immutable")
            if entry is not None and entry.loaded:
                entry.refs += 1
                return adapter
        if entry is None and path is None:
            raise ValueError(f"adapter {adapter!r} is not loaded; give its path")
        known_path = Path(path) if path is not None else entry.path
        read = self._read_adapter(known_path) if entry is None else None
        with self._model_lock:  # waits for the current step: the model does not change under a forward
            with self._state:
                entry = self._adapters.setdefault(adapter, read) if read is not None else self._adapters.get(adapter)
                if entry is None:  # collected between the two looks: read it again
                    entry = self._adapters[adapter] = self._read_adapter(known_path)
                entry.refs += 1
            try:
                self._load_adapter_weights(adapter)
            except BaseException:
                with self._state:
                    entry.refs -= 1
                    if entry.refs == 0 and adapter != self._current and not entry.loaded:
                        self._adapters.pop(adapter, None)
                raise
        return adapter

    async def asubmit(self, history, **options):
        """`submit` for async code: loading the model, or a pinned adapter, runs in a worker thread."""
        if not self.loaded:
            await self.aload()
        adapter = options.pop("adapter", CURRENT)
        path = options.pop("adapter_path", None)
        if adapter is CURRENT or adapter is None or adapter in self.loaded_adapters:
            return self.submit(history, adapter=adapter, adapter_path=path, **options)
        limits = self._limits(options.pop("max_new_tokens", None), options.pop("temperature", None), options.pop("top_p", None))
        self.check_room()
        system, seed, on_event = options.pop("system", None), options.pop("seed", None), options.pop("on_event", None)
        if options:
            raise TypeError(f"unexpected options: {', '.join(sorted(options))}")
        adapter = await asyncio.to_thread(self._bind, adapter, path)
        return self._enqueue(history, adapter, system, limits, seed, on_event)

    async def stream(self, history, **options):
        """Yield Token(text)... then Done(stats); closing the iteration early cancels the request."""
        request = await self.asubmit(history, **options)
        try:
            async for event in request:
                yield event
        finally:
            request.cancel()

    def generate(self, history, *, timeout=None, **options):
        """Answer synchronously: (text, stats). Blocks the calling thread, so not in an event loop."""
        return self.submit(history, **options).result(timeout)

    def metrics(self):
        with self._state:
            return {
                "backend": self.backend,
                "backend_reason": self.backend_reason,
                "loaded": self.loaded,
                "device": str(self.device) if self.device else None,
                "dtype": self._dtype_name(),
                "dtype_reason": self.dtype_reason,
                "running": self._running,
                "waiting": len(self._waiting),
                "max_active": self.config.max_active,
                "max_waiting": self.config.max_waiting,
                "current_adapter": self._current,
                "loaded_adapters": sorted(n for n, a in self._adapters.items() if a.loaded),
                "decode_steps": self.decode_steps,
                "max_batch_seen": self.max_batch_seen,
                "requests_finished": self.requests_finished,
                "latency_ema_s": self._latency_ema,
            }

    def _release(self, adapter):
        if adapter is None:
            return
        with self._state:
            self._adapters[adapter].refs -= 1
            if self._adapters[adapter].refs == 0 and adapter != self._current:
                self._garbage.add(adapter)
        self._wake()

    def _wake(self):
        with self._state:
            self._state.notify_all()

    # -----------------------------------------------------------------------------------------
    # the decode thread

    def _decoding(self):
        """The context the decode loop runs in (the transformers engine: inference mode)."""
        return contextlib.nullcontext()

    def _run(self):
        try:
            with self._decoding():
                try:
                    while self._iterate():
                        pass
                except Exception:  # a bug in the loop itself: fail every request rather than hang them
                    logger.exception("the decode loop crashed")
                    self._fail_all(ERROR, "the decode loop crashed")
                    with self._state:
                        self._closed = True
                    return
            self._fail_all(CANCELLED, "the engine closed")
        finally:
            self._unload_model()

    def _iterate(self):
        """One loop iteration: admit, expire, collect adapters, one backend step. False = stop."""
        with self._state:
            while not (self._closed or self._waiting or self._prefilling or self._has_rows() or self._garbage_ready()):
                self._state.wait()
            if self._closed:
                return False
            while self._waiting and self._running < self.config.max_active:
                request = self._waiting.popleft()
                request._phase = "running"
                request.stats.queued_ms = (time.monotonic() - request._created) * 1000
                self._prefilling.append(request)
                self._running += 1
            expired = [r for r in self._waiting if self._reason_to_end(r)]
            for request in expired:
                self._waiting.remove(request)
        for request in expired:
            self._finish(request, self._reason_to_end(request))
        if self._garbage:
            self._collect_garbage()
        self._step()
        return True

    def _garbage_ready(self):
        return any(n != self._current and self._adapters[n].refs == 0 for n in self._garbage)

    def _reason_to_end(self, request):
        if request._cancelled.is_set():
            return CANCELLED
        if time.monotonic() - request._created > self.config.max_seconds:
            return TIMEOUT
        return None

    def _prefill_queue(self):
        """The requests waiting for (more of) their prefill, in order; the cancelled and timed-out
        ones are ended on the way."""
        for request in list(self._prefilling):
            reason = self._reason_to_end(request)
            if reason:
                self._end_prefill(request, reason)
            else:
                yield request

    def _end_prefill(self, request, reason, error=None):
        self._prefilling.remove(request)
        self._finish(request, reason, error=error)

    def _start_stream(self, request):
        """The decode state of a request whose prefill begins."""
        from llm.engine.textstream import TextStream

        request._stream = TextStream(self.tokenizer)
        if request.temperature > 0:
            request._generator = self._sampling.seeded_generator(request.seed)

    def _next_token(self, request, logits):
        """The next id from one row of logits (a torch tensor): greedy, or sampled with the request's generator."""
        if request.temperature <= 0:
            return self._sampling.greedy(logits.view(1, -1))[0]
        return self._sampling.sample(logits, request.temperature, request.top_p, request._generator)

    def _accept(self, request, token):
        """Take a generated token: stream it, or finish. True while the request goes on."""
        reason = self._reason_to_end(request)
        if reason:
            self._finish(request, reason)
            return False
        if token in self._stop_ids:
            self._finish(request, STOP)
            return False
        request._generated += 1
        if request._generated == 1:
            request.stats.first_token_ms = (time.monotonic() - request._created) * 1000
        if not self._send(request, request._stream.push(token)):
            self._finish(request, FILTERED)
            return False
        if request._generated >= request.max_new_tokens:
            self._finish(request, LENGTH)
            return False
        request._last = token
        return True

    def _finish(self, request, reason, error=None):
        if request._phase == "done":
            return
        if reason != CANCELLED and request._stream is not None:
            if not self._send(request, request._stream.finish()):
                reason = FILTERED
            elif request._guard is not None:
                self._send(request, request._guard.finish(), guarded=False)  # the held tail was safe
        latency = time.monotonic() - request._created
        stats = request.stats
        stats.finish_reason, stats.tokens, stats.error = reason, request._generated, error
        stats.latency_ms = latency * 1000
        with self._state:
            if request._phase == "running":
                self._running -= 1
            request._phase = "done"
            self.requests_finished += 1
            if reason in (STOP, LENGTH):
                self._latency_ema = latency if self._latency_ema is None else 0.8 * self._latency_ema + 0.2 * latency
        self._free_slot(request)
        self._release(request.adapter)
        request._deliver(Done(stats))
        request._done.set()

    def _send(self, request, piece, guarded=True):
        """Stream `piece` past the leak guard; False when the guard tripped (nothing more is sent)."""
        if guarded and request._guard is not None:
            if request._guard.tripped:
                return False
            piece = request._guard.push(piece)
            if request._guard.tripped:
                logger.warning("request %s stopped: its answer began to repeat protected text", request.id)
                return False
        if piece:
            request._deliver(Token(piece))
        return True

    def _fail_all(self, reason, error):
        with self._state:
            pending = list(self._waiting) + list(self._prefilling) + self._rows()
            self._waiting.clear()
            self._prefilling.clear()
        self._clear_rows()
        for request in pending:
            self._finish(request, reason, error=error)

    # -----------------------------------------------------------------------------------------
    # what a backend provides

    def _load_model(self):
        """Load the model and tokenizer (under the load lock); set device, dtype, dtype_reason and
        call `_use_tokenizer`."""
        raise NotImplementedError

    def _unload_model(self):
        """On the decode thread as it ends: free what the backend holds outside Python's reach."""

    def _load_adapter_weights(self, name):
        """Under _model_lock: make adapter `name` servable (a no-op when it already is)."""
        raise NotImplementedError

    def _unload_adapter_weights(self, name):
        """Under _model_lock and _state: drop a loaded adapter that no request uses."""
        raise NotImplementedError

    def _has_rows(self):
        """Under _state: whether sequences are decoding (the loop must not sleep)."""
        raise NotImplementedError

    def _rows(self):
        """Under _state: the decoding requests, as a new list."""
        raise NotImplementedError

    def _clear_rows(self):
        """Forget every decoding sequence (the loop is ending)."""
        raise NotImplementedError

    def _free_slot(self, request):
        """A request finished: free its per-sequence state."""
        request._slot = None

    def _step(self):
        """Prefill a chunk of the newcomers' prompts and decode one token of every running sequence."""
        raise NotImplementedError
