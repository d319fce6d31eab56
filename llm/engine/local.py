"""What every in-process backend shares: the Engine protocol over a model loaded here, and the
decode loop that drives it.

    engine = TransformersEngine(EngineConfig(base_dir="var/models/base"))  # or LlamaCppEngine
    engine.set_adapter("v3", "var/adapters/v3/adapter")            # new requests answer with v3
    text, stats = engine.generate([Turn("user", "如何退货？")])      # sync (tests, REST)
    async for event in engine.stream(history):                     # async
        ...  # Token(text) ... then Done(stats)

    request = await engine.asubmit(history, max_new_tokens=128)    # a consumer that needs the handle:
    request.adapter                                                # for its "start" frame
    async for event in request: ...                                # request.cancel() on disconnect

How it runs. `submit()` binds the request to the adapter that is current at that moment (a
reference is held until it finishes), renders and tokenises the prompt in the caller's thread (the
one renderer training uses, with the checkpoint's Hugging Face tokenizer, in the prompt format
that adapter was trained on: recorded with it, Gemma's when unrecorded, the checkpoint's own for
the base model), refuses what it must (EngineBusy beyond K running + Q waiting, InputTooLong),
and queues its Sequence, which stops on the end-of-turn ids of that same format. A single
background thread loops; each iteration the Scheduler admits waiting sequences while fewer than
K run and ends the cancelled and timed-out ones, the AdapterTable unloads adapters that are
neither current nor used, and the backend runs one step: prefill of newcomers (at most
`prefill_chunk` prompt tokens in all) and one decode of every running sequence (continuous
batching: sequences join and leave between steps). Generated ids go through `_accept`, which
streams their text (AnswerText: the text stream, then the leak guard) or finishes the sequence.

Events reach the caller through the Request handle: an asyncio queue when it was submitted from
an event loop, and `on_event` (called on the decode thread: keep it short) when one is given.

A backend subclass provides `_load_model`, `_step`, `_has_rows`, `_rows`, `_clear_rows`,
`_free_slot` and the adapter weights' `_load_adapter_weights(name, path)` and
`_unload_adapter_weights(name)`; in its step it calls `_prefill_queue`, `_accept`, `_finish`,
`_end_prefill`, `_reason_to_end`, `_start_output` and `_next_token`. Nothing here imports Django
or torch.
"""

import asyncio
import contextlib
import logging
import threading
import time

from llm.engine.adapters import CURRENT, AdapterTable
from llm.engine.config import EngineConfig, clamp_limits
from llm.engine.drafting import PromptLookup
from llm.engine.events import CANCELLED, ERROR, FILTERED, LENGTH, STOP, EngineClosed
from llm.engine.guard import LeakGuard
from llm.engine.metrics import EngineMetrics
from llm.engine.prompts import fit_conversation
from llm.engine.protocol import DerivedCalls
from llm.engine.request import Request
from llm.engine.scheduler import Scheduler
from llm.engine.sequence import DONE, Sequence
from llm.engine.textstream import AnswerText
from llm.prompting import PromptFormat, prompt_format_for

logger = logging.getLogger(__name__)


class LocalEngine(DerivedCalls):
    backend = ""  # "transformers" or "llamacpp": the metrics and the admin say which one serves
    adapter_file = "adapter_config.json"  # what an adapter directory must hold for this backend
    adapter_hint = ""  # how to make that file when it is missing
    remote = False
    supports_choices = True  # submit(..., choices=...): a one-token pick among given answers

    def __init__(self, config: EngineConfig, *, clock=time.monotonic):
        self.config = config
        self.backend_reason = ""  # why this backend serves; set by whoever chose it
        # Filled by load(); constructing an engine loads nothing.
        self.device = self.dtype = self.dtype_reason = None
        self.tokenizer = None
        self._loaded = False
        self.base_format = None  # the PromptFormat of the base model without an adapter, known once loaded
        self._stop_ids = {}  # PromptFormat -> the ids an answer in that format stops on
        self._prompt_budget = config.max_input_tokens
        self._sampling = None  # llm.engine.sampling, imported by load() (it imports torch)
        self._thread = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.RLock()  # a forward, or an adapter load/unload; taken before the scheduler's lock
        self.clock = clock
        self.counters = EngineMetrics()
        self.scheduler = Scheduler(config, self.counters, clock)
        self.adapters = AdapterTable(
            lock=self.scheduler.lock, model_lock=self._model_lock, file=self.adapter_file, hint=self.adapter_hint,
            load_weights=self._load_adapter, unload_weights=self._unload_adapter_weights,
            model_loaded=lambda: self._loaded,
        )

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
            if self.scheduler.closed:
                raise EngineClosed("the engine is closed")
            from llm.engine import sampling  # noqa: PLC0415  (torch: paid for by load(), not by import)

            self._sampling = sampling
            self._load_model()
            with self._model_lock:
                self._loaded = True
                self.adapters.load_current()
            self._thread = threading.Thread(target=self._run, name=f"chat-engine-{self.backend}", daemon=True)
            self._thread.start()
            logger.info(
                "%s engine loaded %s on %s as %s (%s)",
                self.backend, self.config.base_dir, self.device, self._dtype_name(), self.dtype_reason,
            )

    def _use_tokenizer(self, tokenizer, max_positions):
        """Take the checkpoint's tokenizer, the stop ids of each format it can render and the model's
        positions (the prompt budget)."""
        from llm.generation import stop_token_ids  # noqa: PLC0415  (torch: paid for by load(), not by import)

        budget = self.config.max_input_tokens
        if max_positions:
            budget = min(budget, max_positions - self.config.max_new_tokens)
        if budget < 1:
            raise ValueError(
                f"max_new_tokens={self.config.max_new_tokens} leaves no room for a prompt in this model's "
                f"{max_positions} positions"
            )
        self.tokenizer = tokenizer
        self.base_format = prompt_format_for(tokenizer)
        # Gemma's for the adapters trained before formats were recorded; the template's where there is one.
        formats = {PromptFormat.GEMMA, self.base_format}
        self._stop_ids = {fmt: frozenset(stop_token_ids(tokenizer, fmt)) for fmt in formats}
        self._prompt_budget = budget

    def _dtype_name(self):
        return str(self.dtype).removeprefix("torch.") if self.dtype else None

    async def aload(self):
        await asyncio.to_thread(self.load)

    def close(self, timeout=10):
        """Stop the decode thread; unfinished requests end as "cancelled". The engine takes no more."""
        self.scheduler.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -----------------------------------------------------------------------------------------
    # adapters

    def set_adapter(self, name, path=None):
        """Serve new requests with adapter `name` (loaded from `path` the first time); None = base model.

        Requests already submitted finish on the adapter they started with; the previous adapter
        is deleted once none of them uses it. Loading waits for the current decode step (the
        model is not changed under a running forward); from async code use
        `await asyncio.to_thread(engine.set_adapter, ...)`.
        """
        self.adapters.set_current(name, path)

    def _load_adapter(self, name, path):
        """Under the model lock, the model loaded: an adapter whose prompts this checkpoint can render
        is loaded; one trained on a chat template the tokenizer no longer has is refused here, not
        on every request."""
        with self.scheduler.lock:
            prompt_format = self.adapters.prompt_format(name)
        if prompt_format not in self._stop_ids:
            raise ValueError(
                f"adapter {name!r} was trained on the checkpoint's chat template, and the tokenizer of "
                f"{str(self.config.base_dir)!r} has none: it cannot be served in the format it learnt"
            )
        self._load_adapter_weights(name, path)

    @property
    def current_adapter(self):
        return self.adapters.current

    @property
    def loaded_adapters(self):
        return self.adapters.loaded_names()

    # -----------------------------------------------------------------------------------------
    # requests

    def render(self, history, system=None):
        """The Prompt (text, ids, dropped_turns) that answering `history` would use now."""
        self.load()
        with self.scheduler.lock:
            system = self._system_for(self.adapters.current, system)
            prompt_format = self._format_for(self.adapters.current)
        return self._render(history, system, prompt_format)

    def _render(self, history, system, prompt_format):
        return fit_conversation(
            self.tokenizer,
            history,
            system=system,
            max_tokens=self._prompt_budget,
            max_message_chars=self.config.max_message_chars,
            prompt_format=prompt_format,
        )

    def _format_for(self, adapter):
        """Under the scheduler's lock: the format `adapter` was trained on (None: the base model's own)."""
        trained = self.adapters.prompt_format(adapter)
        return trained if trained is not None else self.base_format

    def _system_for(self, adapter, system):
        """Under the scheduler's lock: the caller's system prompt, else the adapter's training one, else the config's."""
        if system is not None:
            return system
        trained = self.adapters.system_prompt(adapter)
        return trained if trained is not None else self.config.system_prompt

    def submit(
        self, history, *, system=None, max_new_tokens=None, temperature=None, top_p=None, seed=None, on_event=None,
        adapter=CURRENT, adapter_path=None, choices=None,
    ):
        """Queue an answer to `history` (Turns ending with the user's message, or one string).

        `adapter` pins the answer to one adapter (a name; `adapter_path` where the engine has not
        loaded it yet; None = the base model) instead of the current one. A pinned adapter is
        loaded for the request and unloaded after it, unless it is current by then.

        `choices` (strings, one token each) makes the answer one token, the likeliest of those
        (not sampled), and its Stats.choice_probs their probabilities: a classification, such as
        a grounded adapter naming which retrieved pair matches (chat.grounding.rerank).

        Raises EngineBusy (never waits for room), InputTooLong, EngineClosed, ValueError,
        FileNotFoundError (no adapter at adapter_path). Loads the model on first use (blocking:
        async callers use `asubmit` or `stream`). Returns a Request.
        """
        limits = clamp_limits(self.config, max_new_tokens, temperature, top_p)
        self.load()
        choice_ids = self._choice_ids(choices)
        self.check_room()
        adapter = self.adapters.bind(adapter, adapter_path)  # a reference held until the request finishes
        return self._enqueue(history, adapter, system, limits, seed, on_event, choice_ids)

    def busy_now(self):
        """EngineBusy when K run and Q wait at this moment, else None, read without waiting for a
        lock: for a caller on an event loop that wants to refuse before any other work. Advisory
        (a request may finish meanwhile); `submit` checks again under the lock."""
        return self.scheduler.busy()

    def check_room(self):
        """Raise EngineClosed or EngineBusy now if `submit` would: callers with work to do before
        submitting (storing the question) refuse first, cheaply."""
        self.scheduler.check_room()

    def _choice_ids(self, choices):
        """The token id of each choice; ValueError for a choice that is not exactly one token, or
        two that are the same one. () for none."""
        if not choices:
            return ()
        ids = []
        for choice in choices:
            encoded = self.tokenizer.encode(str(choice), add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"choice {choice!r} is {len(encoded)} tokens, not one")
            ids.append(encoded[0])
        if len(set(ids)) != len(ids):
            raise ValueError("two choices are the same token")
        return tuple(ids)

    def _enqueue(self, history, adapter, system, limits, seed, on_event, choice_ids=()):
        """Render, make the Request and its Sequence and queue it; the adapter's reference is
        released on failure."""
        max_new_tokens, temperature, top_p = limits
        if choice_ids:
            max_new_tokens = 1
        try:
            with self.scheduler.lock:
                system = self._system_for(adapter, system)
                prompt_format = self._format_for(adapter)
            prompt = self._render(history, system, prompt_format)
            request = Request(
                prompt=prompt, adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seed, on_event=on_event, clock=self.clock, choice_ids=choice_ids,
            )
            protected = (system, *self.config.canaries) if self.config.guard_min_run else ()
            self.scheduler.enqueue(Sequence(request, protected, stop_ids=self._stop_ids[prompt_format]))
        except BaseException:
            self.adapters.release(adapter)
            raise
        return request

    async def asubmit(self, history, **options):
        """`submit` for async code: loading the model, or a pinned adapter, runs in a worker thread."""
        if not self.loaded:
            await self.aload()
        adapter = options.pop("adapter", CURRENT)
        path = options.pop("adapter_path", None)
        if adapter is CURRENT or adapter is None or adapter in self.loaded_adapters:
            return self.submit(history, adapter=adapter, adapter_path=path, **options)
        limits = clamp_limits(
            self.config, options.pop("max_new_tokens", None), options.pop("temperature", None), options.pop("top_p", None)
        )
        self.check_room()
        system, seed, on_event = options.pop("system", None), options.pop("seed", None), options.pop("on_event", None)
        choice_ids = self._choice_ids(options.pop("choices", None))
        if options:
            raise TypeError(f"unexpected options: {', '.join(sorted(options))}")
        adapter = await asyncio.to_thread(self.adapters.bind, adapter, path)
        return self._enqueue(history, adapter, system, limits, seed, on_event, choice_ids)

    # counters that tests and benchmarks read
    @property
    def decode_steps(self):
        return self.counters.decode_steps

    @property
    def max_batch_seen(self):
        return self.counters.max_batch_seen

    @property
    def requests_finished(self):
        return self.counters.requests_finished

    def metrics(self):
        scheduler = self.scheduler
        with scheduler.lock:
            return {
                "backend": self.backend,
                "backend_reason": self.backend_reason,
                "loaded": self.loaded,
                "device": str(self.device) if self.device else None,
                "dtype": self._dtype_name(),
                "dtype_reason": self.dtype_reason,
                "running": scheduler.running,
                "waiting": len(scheduler.waiting),
                "max_active": self.config.max_active,
                "max_waiting": self.config.max_waiting,
                "current_adapter": self.adapters.current,
                "loaded_adapters": self.adapters.loaded_names(),
                **self.counters.as_dict(),
            }

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
                    self.scheduler.close()
                    return
            self._fail_all(CANCELLED, "the engine closed")
        finally:
            self._unload_model()

    def _iterate(self):
        """One loop iteration: admit, expire, collect adapters, one backend step. False = stop."""
        if not self.scheduler.wait_for_work(lambda: self._has_rows() or self.adapters.garbage_ready()):
            return False
        for sequence, reason in self.scheduler.admit():
            self._finish(sequence, reason)
        if self.adapters.has_garbage:
            self.adapters.collect()
        self._step()
        return True

    def _reason_to_end(self, sequence):
        return self.scheduler.reason_to_end(sequence)

    def _prefill_queue(self):
        """The sequences waiting for (more of) their prefill, in order; the cancelled and timed-out
        ones are ended on the way."""
        for sequence in list(self.scheduler.prefilling):
            reason = self._reason_to_end(sequence)
            if reason:
                self._end_prefill(sequence, reason)
            else:
                yield sequence

    def _end_prefill(self, sequence, reason, error=None):
        """End a sequence that is still prefilling (or leave the prefill queue as a complete prompt, reason None)."""
        with self.scheduler.lock:
            if sequence in self.scheduler.prefilling:
                self.scheduler.prefilling.remove(sequence)
        if reason is not None:
            self._finish(sequence, reason, error=error)

    def _start_output(self, sequence):
        """The decode state of a sequence whose prefill begins: its text output and sampler."""
        guard = LeakGuard(sequence.protected, min_run=self.config.guard_min_run) if sequence.protected else None
        sequence.output = AnswerText(self.tokenizer, guard)
        if sequence.temperature > 0:
            sequence.generator = self._sampling.seeded_generator(sequence.request.seed)
        elif self.config.draft_tokens and not sequence.request.choice_ids:
            sequence.drafter = PromptLookup(sequence.prompt_ids, max_draft=self.config.draft_tokens)

    def _draft(self, sequence):
        """The draft tokens to verify with a decoding sequence's next step ([] for none): never
        more than the answer may still take after its next token."""
        if sequence.drafter is None:
            return []
        return sequence.drafter.propose(room=sequence.request.max_new_tokens - sequence.generated - 1)

    def _accept_verified(self, sequence, predicted, draft):
        """Take the result of a step that fed a sequence its last token followed by `draft`:
        `predicted[i]` is the model's next token after the i-th of those inputs (so len(draft) + 1
        of them). predicted[0] is the next token; each later one counts only while the draft
        before it matched what the model predicted. Returns (inputs kept, alive): the first
        `inputs kept` fed tokens stay in the KV cache (the rest must be removed), and whether the
        sequence goes on. Greedy decoding without a draft would have produced the same tokens."""
        kept = 0
        alive = True
        for index, token in enumerate(predicted):
            kept += 1
            if not self._accept(sequence, token):
                alive = False
                break
            if index == len(draft) or token != draft[index]:
                break
        if draft:
            taken = kept - 1
            if sequence.drafter is not None:
                sequence.drafter.feedback(len(draft), taken)
            self.counters.verified(len(draft), taken)
        return kept, alive

    def _next_token(self, sequence, logits):
        """The next id from one row of logits (a torch tensor): greedy, or sampled with the sequence's
        generator; for a request with choices, the likeliest choice (their probabilities go to its Stats)."""
        request = sequence.request
        if request.choice_ids:
            probs = self._sampling.choice_probabilities(logits.view(-1), request.choice_ids)
            request.stats.choice_probs = probs
            return request.choice_ids[max(range(len(probs)), key=probs.__getitem__)]
        if sequence.temperature <= 0:
            return self._sampling.greedy(logits.view(1, -1))[0]
        return self._sampling.sample(logits, sequence.temperature, sequence.request.top_p, sequence.generator)

    def _accept(self, sequence, token):
        """Take a generated token: stream it, or finish. True while the sequence goes on."""
        reason = self._reason_to_end(sequence)
        if reason:
            self._finish(sequence, reason)
            return False
        if token in sequence.stop_ids:
            self._finish(sequence, STOP)
            return False
        request = sequence.request
        sequence.generated += 1
        if sequence.generated == 1:
            request.stats.first_token_ms = (self.clock() - request.created) * 1000
        piece = sequence.output.push(token)
        if sequence.output.tripped:
            logger.warning("request %s stopped: its answer began to repeat protected text", request.id)
            self._finish(sequence, FILTERED)
            return False
        request.emit(piece)
        if sequence.drafter is not None:
            sequence.drafter.extend(token)
        if sequence.generated >= request.max_new_tokens:
            self._finish(sequence, LENGTH)
            return False
        sequence.last = token
        return True

    def _finish(self, sequence, reason, error=None):
        if sequence.phase == DONE:
            return
        request, output = sequence.request, sequence.output
        if reason != CANCELLED and output is not None and not output.tripped:
            pieces = output.finish()
            if output.tripped:
                logger.warning("request %s stopped: its answer began to repeat protected text", request.id)
                reason = FILTERED
            for piece in pieces:
                request.emit(piece)
        latency = self.clock() - request.created
        stats = request.stats
        stats.finish_reason, stats.tokens, stats.error = reason, sequence.generated, error
        stats.latency_ms = latency * 1000
        with self.scheduler.lock:
            self.counters.finished(reason, latency)
        self.scheduler.finished(sequence)
        self._free_slot(sequence)
        self.adapters.release(request.adapter)
        request.finish(stats, output.ids if output is not None else ())

    def _fail_all(self, reason, error):
        with self.scheduler.lock:
            pending = self.scheduler.drain() + self._rows()
        self._clear_rows()
        for sequence in pending:
            self._finish(sequence, reason, error=error)

    # -----------------------------------------------------------------------------------------
    # what a backend provides

    def _load_model(self):
        """Load the model and tokenizer (under the load lock); set device, dtype, dtype_reason and
        call `_use_tokenizer`."""
        raise NotImplementedError

    def _unload_model(self):
        """On the decode thread as it ends: free what the backend holds outside Python's reach."""

    def _load_adapter_weights(self, name, path):
        """Under the model lock: make adapter `name` (its directory: `path`) servable."""
        raise NotImplementedError

    def _unload_adapter_weights(self, name):
        """Under the model lock and the scheduler's lock: drop a loaded adapter that no request uses."""
        raise NotImplementedError

    def _has_rows(self):
        """Under the scheduler's lock: whether sequences are decoding (the loop must not sleep)."""
        raise NotImplementedError

    def _rows(self):
        """Under the scheduler's lock: the decoding sequences, as a new list."""
        raise NotImplementedError

    def _clear_rows(self):
        """Forget every decoding sequence (the loop is ending)."""
        raise NotImplementedError

    def _free_slot(self, sequence):
        """A sequence finished: free its per-sequence state."""
        sequence.slot = None

    def _step(self):
        """Prefill a chunk of the newcomers' prompts and decode one token of every running sequence."""
        raise NotImplementedError

