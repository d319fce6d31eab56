"""The transformers inference engine: one model per process, one decode thread, many streams.

    from chat.engine import Engine, EngineConfig, Turn
    engine = Engine(EngineConfig(base_dir="var/models/base"))     # loads nothing yet
    engine.set_adapter("v3", "var/adapters/v3/adapter")            # new requests answer with v3
    text, stats = engine.generate([Turn("user", "如何退货？")])      # sync (tests, REST)
    async for event in engine.stream(history):                     # async
        ...  # Token(text) ... then Done(stats)

    request = await engine.asubmit(history, max_new_tokens=128)    # a consumer that needs the handle:
    request.adapter                                                # for its "start" frame
    async for event in request: ...                                # request.cancel() on disconnect

How it runs. `submit()` renders and tokenises the prompt in the caller's thread, refuses what it
must (EngineBusy beyond K running + Q waiting, InputTooLong), binds the request to the adapter
that is current at that moment, and appends it to the waiting queue. A single background thread
loops; each iteration it

  1. admits waiting requests while fewer than K run, and ends the cancelled and timed-out ones;
  2. prefills newcomers, at most `prefill_chunk` prompt tokens in all, each into its own cache;
     a newcomer whose prompt is complete samples its first token and is spliced into the batch;
  3. runs ONE forward for every running sequence (continuous batching: the batch changes at step
     boundaries), samples a token per row, streams the text, and drops the rows that finished.

Rows may use different adapters: a batch on one adapter runs the plain PEFT forward; a mixed batch
passes PEFT's per-row `adapter_names` (the base model is "__base__"). An adapter that is no longer
current is deleted from the model once the last request bound to it has finished.

Events reach the caller through an asyncio queue (`loop.call_soon_threadsafe`) when the request
was submitted from an event loop, and through `on_event` (called on the decode thread: keep it
short) when one is given. Nothing here imports Django; torch is imported by `load()`.
"""

import asyncio
import collections
import json
import logging
import math
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from chat.engine.config import EngineConfig
from chat.engine.events import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    TIMEOUT,
    Done,
    EngineBusy,
    EngineClosed,
    Stats,
    Token,
)
from chat.engine.prompts import fit_conversation
from chat.engine.textstream import TextStream

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
CURRENT = object()  # submit(adapter=CURRENT): the adapter new requests get now (the default)


def _fresh_input(module, args):
    """LM-head pre-hook: hand the head a freshly allocated copy of its input.

    With LoRA layers injected, the last hidden state reaching the head is a view into a larger
    buffer, and the bf16 GEMV on it took 0.8-3 s on the first token of a prompt (measured: 3.2 s
    with the hook off against 0.22 s with it on, Gemma-3-270M, one CPU). The copy is one row per
    sequence: microseconds.
    """
    return (args[0].contiguous().clone(), *args[1:])


@dataclass
class _Adapter:
    path: Path
    system_prompt: str | None  # what it was trained with (finetune_config.json), if recorded
    refs: int = 0  # requests bound to it that have not finished
    loaded: bool = False  # its weights are in the model


def _read_adapter(path):
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {str(path)!r} (adapter_config.json is missing)")
    saved = path / "finetune_config.json"
    system = json.loads(saved.read_text(encoding="utf-8")).get("system_prompt") if saved.is_file() else None
    return _Adapter(path=path.resolve(), system_prompt=system)


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
        self._cache = None  # its own KV cache while prefilling
        self._prefilled = 0  # prompt tokens in that cache
        self._position = 0  # tokens in the KV cache = position of the next input token
        self._last = None  # last generated token: the next step's input
        self._generated = 0
        self._generator = None

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


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        # Filled by load(); constructing an engine loads nothing.
        self.device = self.dtype = self.dtype_reason = None
        self.tokenizer = None
        self._model = None  # the transformers model (LoRA layers injected once an adapter is loaded)
        self._peft = None  # the PeftModel around it, from the first adapter on
        self._peft_selected = None  # the adapter this engine last selected in PEFT for a whole batch
        self._stop_ids = frozenset()
        self._prompt_budget = config.max_input_tokens
        self._keep_logits = False
        self._cache_kwarg = "past_key_values"
        self._torch = self._batching = None
        self._thread = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.RLock()  # a forward, or an adapter load/delete; taken before _state
        self._state = threading.Condition()  # queue, counters, adapter table; held briefly
        self._waiting = collections.deque()
        self._prefilling = []
        self._batch = None
        self._running = 0  # prefilling + in the batch (the K in K + Q)
        self._adapters = {}  # name -> _Adapter
        self._current = None  # adapter name for new requests; None = base model
        self._garbage = set()  # adapter names to delete on the decode thread when unused
        self._closed = False
        self._latency_ema = None
        # counters that tests and the metrics page read
        self.decode_steps = 0
        self.max_batch_seen = 0
        self.requests_finished = 0

    # -----------------------------------------------------------------------------------------
    # loading

    @property
    def loaded(self):
        return self._model is not None

    def load(self):
        """Load the base model (once; later calls return at once) and start the decode thread."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            if self._closed:
                raise EngineClosed("the engine is closed")
            import inspect

            import torch

            from chat.engine import batch as batching
            from training.finetune import FinetuneConfig, load_base, stop_token_ids

            device = batching.resolve_device(self.config.device)
            dtype, reason = batching.resolve_dtype(self.config.dtype, device)
            loader_config = FinetuneConfig(device=str(device), trust_remote_code=self.config.trust_remote_code)
            model, tokenizer = load_base(self.config.base_dir, loader_config)
            model.to(dtype=dtype)
            model.eval()
            head = model.get_output_embeddings()
            if head is not None:
                head.register_forward_pre_hook(_fresh_input)
            max_positions = getattr(model.config, "max_position_embeddings", None)
            budget = self.config.max_input_tokens
            if max_positions:
                budget = min(budget, max_positions - self.config.max_new_tokens)
            if budget < 1:
                raise ValueError(
                    f"max_new_tokens={self.config.max_new_tokens} leaves no room for a prompt in this model's "
                    f"{max_positions} positions"
                )
            self._torch, self._batching = torch, batching
            self.device, self.dtype, self.dtype_reason = device, dtype, reason
            self.tokenizer = tokenizer
            self._stop_ids = frozenset(stop_token_ids(tokenizer))
            self._prompt_budget = budget
            parameters = inspect.signature(model.forward).parameters
            self._keep_logits = "logits_to_keep" in parameters
            # transformers 5.24 renamed past_key_values to cache (the old name warns, then goes in 5.40)
            self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
            self._batch = batching.Batch(device)
            with self._model_lock:
                self._model = model
                with self._state:
                    current = self._current
                if current is not None:
                    self._load_adapter_weights(current)
            self._thread = threading.Thread(target=self._run, name="chat-engine-decode", daemon=True)
            self._thread.start()
            logger.info("engine loaded %s on %s as %s (%s)", self.config.base_dir, device, dtype, reason)

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

    def set_adapter(self, name, path=None):
        """Serve new requests with adapter `name` (loaded from `path` the first time); None = base model.

        Requests already submitted finish on the adapter they started with; the previous adapter
        is deleted from the model once none of them uses it. Loading waits for the current decode
        step (the model is not changed under a running forward); from async code use
        `await asyncio.to_thread(engine.set_adapter, ...)`.
        """
        adapter = None
        if name is not None:
            with self._state:
                known = self._adapters.get(name)
            if known is None:
                if path is None:
                    raise ValueError(f"adapter {name!r} is not loaded; give its path")
                adapter = _read_adapter(path)
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
            if name is not None and self._model is not None:
                try:
                    self._load_adapter_weights(name)
                except Exception:
                    with self._state:  # leave the engine as it was
                        self._current = previous
                        self._garbage.discard(previous)
                        self._adapters.pop(name, None)
                    raise
            if self._model is None:
                self._collect_garbage()  # nothing loaded: just forget the unused entries
        self._wake()

    def _load_adapter_weights(self, name):
        """Under _model_lock: put the adapter's weights in the model if they are not there yet."""
        adapter = self._adapters[name]
        if adapter.loaded:
            return
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._model, adapter.path, adapter_name=name, is_trainable=False)
        else:
            self._peft.load_adapter(adapter.path, adapter_name=name, is_trainable=False)
        self._peft.eval()
        self._peft_selected = None  # loading may change PEFT's active adapter
        adapter.loaded = True
        logger.info("adapter %s loaded from %s", name, adapter.path)

    def _collect_garbage(self):
        """Delete adapters that are not current and that no request uses any more."""
        with self._model_lock, self._state:
            unused = [n for n in self._garbage if n != self._current and self._adapters[n].refs == 0]
            for name in unused:
                self._garbage.discard(name)
                adapter = self._adapters.pop(name)
                if adapter.loaded:
                    with warnings.catch_warnings():  # "... was active, setting active adapter to ...": expected
                        warnings.simplefilter("ignore", UserWarning)
                        self._peft.delete_adapter(name)
                    self._peft_selected = None
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
        self._check_room()
        adapter = self._bind(adapter, adapter_path)  # a reference held until the request finishes
        return self._enqueue(history, adapter, system, limits, seed, on_event)

    def _check_room(self):
        with self._state:
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
            with self._state:
                if self._closed:
                    raise EngineClosed("the engine is closed")
                busy = self._busy()
                if busy:
                    raise busy
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
        read = _read_adapter(known_path) if entry is None else None
        with self._model_lock:  # waits for the current step: the model does not change under a forward
            with self._state:
                entry = self._adapters.setdefault(adapter, read) if read is not None else self._adapters.get(adapter)
                if entry is None:  # collected between the two looks: read it again
                    entry = self._adapters[adapter] = _read_adapter(known_path)
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
        self._check_room()
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
                "loaded": self.loaded,
                "device": str(self.device) if self.device else None,
                "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None,
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

    def _run(self):
        with self._torch.inference_mode():
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

    def _iterate(self):
        """One loop iteration: admit, expire, prefill a chunk, decode one step. False = stop."""
        with self._state:
            while not (self._closed or self._waiting or self._prefilling or self._batch.rows or self._garbage_ready()):
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
        self._prefill()
        self._decode_step()
        return True

    def _garbage_ready(self):
        return any(n != self._current and self._adapters[n].refs == 0 for n in self._garbage)

    def _reason_to_end(self, request):
        if request._cancelled.is_set():
            return CANCELLED
        if time.monotonic() - request._created > self.config.max_seconds:
            return TIMEOUT
        return None

    def _forward(self, adapters, inputs):
        """One forward under the model lock; returns the last position's logits, [rows, vocab]."""
        if self._keep_logits:
            inputs["logits_to_keep"] = 1
        with self._model_lock:
            if self._peft is None or not self._peft.peft_config:
                output = self._model(**inputs)
            elif len(set(adapters)) == 1 and adapters[0] is not None:
                # Our own record, not PEFT's: after delete_adapter PEFT can still report a name as
                # active, and a version reloaded under that name would then be skipped.
                if self._peft_selected != adapters[0]:
                    self._peft.set_adapter(adapters[0], inference_mode=True)
                    self._peft_selected = adapters[0]
                output = self._peft(**inputs)
            else:
                output = self._peft(**inputs, adapter_names=[a if a is not None else BASE for a in adapters])
        return output.logits[:, -1, :]

    def _prefill(self):
        """Prefill waiting prompts, `prefill_chunk` tokens in all; complete ones join the batch."""
        budget = self.config.prefill_chunk
        for request in list(self._prefilling):
            if budget <= 0:
                break
            reason = self._reason_to_end(request)
            if reason:
                self._prefilling.remove(request)
                self._finish(request, reason)
                continue
            ids = request.prompt.ids
            if request._cache is None:
                request._cache = self._batching.new_cache()
                request._stream = TextStream(self.tokenizer)
                request._generator = (
                    self._batching.seeded_generator(request.seed) if request.temperature > 0 else None
                )
            chunk = ids[request._prefilled : request._prefilled + budget]
            inputs = self._batching.prefill_inputs(chunk, request._prefilled, self.device)
            inputs[self._cache_kwarg] = request._cache
            try:
                logits = self._forward([request.adapter], inputs)
            except Exception as error:
                logger.exception("prefill of request %s failed", request.id)
                self._prefilling.remove(request)
                self._finish(request, ERROR, error=f"{type(error).__name__}: {error}")
                continue
            request._prefilled += len(chunk)
            budget -= len(chunk)
            if request._prefilled < len(ids):
                continue  # the rest in the next iterations, between decode steps
            self._prefilling.remove(request)
            request._position = len(ids)
            cache, request._cache = request._cache, None
            if self._accept(request, self._next_token(request, logits[0])):
                self._batch.add(request, cache, len(ids))

    def _decode_step(self):
        batch = self._batch
        ended = [(r, reason) for r in batch.rows if (reason := self._reason_to_end(r))]
        if ended:
            batch.remove([r for r, _ in ended])
            for request, reason in ended:
                self._finish(request, reason)
        rows = list(batch.rows)
        if not rows:
            return
        inputs = batch.step_inputs([r._last for r in rows], [r._position for r in rows])
        inputs[self._cache_kwarg] = batch.cache
        try:
            logits = self._forward([r.adapter for r in rows], inputs)
        except Exception as error:
            # Some layers may hold the new column and some not: the shared cache is lost.
            logger.exception("decode step failed for %d requests", len(rows))
            self._batch = self._batching.Batch(self.device)
            for request in rows:
                self._finish(request, ERROR, error=f"{type(error).__name__}: {error}")
            return
        self.decode_steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        greedy = self._batching.greedy(logits) if any(r.temperature <= 0 for r in rows) else None
        finished = []
        for index, request in enumerate(rows):
            request._position += 1
            reason = self._reason_to_end(request)
            if reason:  # cancelled (or out of time) during this step: its token is not sent
                finished.append(request)
                self._finish(request, reason)
                continue
            token = greedy[index] if request.temperature <= 0 else self._next_token(request, logits[index])
            if not self._accept(request, token):
                finished.append(request)
        batch.remove(finished)

    def _next_token(self, request, logits):
        if request.temperature <= 0:
            return self._batching.greedy(logits.view(1, -1))[0]
        return self._batching.sample(logits, request.temperature, request.top_p, request._generator)

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
        piece = request._stream.push(token)
        if piece:
            request._deliver(Token(piece))
        if request._generated >= request.max_new_tokens:
            self._finish(request, LENGTH)
            return False
        request._last = token
        return True

    def _finish(self, request, reason, error=None):
        if request._phase == "done":
            return
        if reason != CANCELLED and request._stream is not None:
            tail = request._stream.finish()
            if tail:
                request._deliver(Token(tail))
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
        request._cache = None
        self._release(request.adapter)
        request._deliver(Done(stats))
        request._done.set()

    def _fail_all(self, reason, error):
        with self._state:
            pending = list(self._waiting) + list(self._prefilling) + list(self._batch.rows if self._batch else [])
            self._waiting.clear()
            self._prefilling.clear()
        if self._batch is not None:
            self._batch.remove(list(self._batch.rows))
        for request in pending:
            self._finish(request, reason, error=error)
