"""The llama.cpp inference engine: the base model's GGUF on the CPU, through llama-cpp-python's C API.

    from llm.engine import LlamaCppEngine, EngineConfig
    engine = LlamaCppEngine(EngineConfig(base_dir="var/models/gemma-3-270m"))   # the contract of Engine

The contract (submit/stream/generate, admission, limits, cancellation, adapters) is
`llm.engine.local.LocalEngine`'s. What differs is below it:

- Prompts are rendered and tokenised exactly as for transformers (`fit_conversation` with the
  checkpoint's Hugging Face tokenizer, in the adapter's prompt format, a chat template's prompt
  without a second BOS) and fed to llama.cpp as ids; each sequence stops on its format's ids;
  generated ids are turned into text by the same TextStream. At load a probe conversation must
  tokenise to the same ids on both sides, in each format the engine may serve, else the GGUF is
  refused: its vocabulary is not the checkpoint's.
- One llama model (the GGUF beside the checkpoint, memory-mapped) and one llama context per
  adapter version in use: a LoRA applies to a whole context, not to a sequence. The base model's
  context serves adapter None. Each running Sequence is a sequence id in its context's KV cache.
  With `EngineConfig.head_type` the model is a copy of that GGUF whose output layer is
  requantised (`gguf_with_head`, made once beside it).
- Each loop iteration fills one `llama_batch` per context with a token for every decoding
  sequence plus up to `prefill_chunk` prompt tokens of newcomers (in all), runs one `llama_decode`
  per context, and takes the next token of each sequence that asked for logits (greedy or
  sampled, as in the transformers engine). A long prompt is prefilled over several iterations
  while the running streams keep decoding. A finished sequence's KV cells are removed at once.
- Prompt-lookup drafts (`EngineConfig.draft_tokens`, llm.engine.drafting): a greedy sequence
  with a draft feeds its last token and the draft in the same batch, each with its logits; the
  greedy token after each is read, the agreeing prefix (and the model's own next token) is
  kept, and the KV cells of the rejected draft tokens are removed. Sequences with and without
  drafts share the batch. No step drafts while a newcomer waits for its prefill or while more
  than DRAFT_MAX_DECODING chats decode.
- Hot swap: a version gets its context when it is set (or pinned); when it is neither current nor
  used any more its context and LoRA are freed. Chats in flight finish in the old context.

Nothing here imports Django; llama_cpp, torch and transformers are imported by `load()`.
"""

import contextlib
import ctypes
import logging
import math
import os
import tempfile
from pathlib import Path

from llm.basemodel import BaseModelError, describe_checkpoint
from llm.engine.events import ERROR, EngineError
from llm.engine.local import LocalEngine
from llm.engine.sequence import RUNNING
from llm.prompting import PromptFormat, Turn, encode_prompt, prompt_format_for, render_conversation

logger = logging.getLogger(__name__)
llama_logger = logging.getLogger("llm.engine.llama_cpp")  # llama.cpp's own messages

# A conversation that must tokenise to the same ids with the checkpoint's tokenizer and the GGUF's
# vocabulary: special tokens, Chinese, digits, punctuation, spaces and a newline.
# Drafts are verified only while at most this many chats decode (see LlamaCppEngine._plan).
DRAFT_MAX_DECODING = 8
PROBE_TURNS = (("user", "如何退货？Order #12345 arrives in 3-5 days."), ("assistant", "您好！请在 7 天内申请。"), ("user", "OK, thanks"))
PROBE_SYSTEM = "你是星河商城的客服。"
HEAD_TENSORS = ("token_embd.weight", "output.weight")  # the output layer (Gemma ties it to the first)


def base_gguf(base_dir):
    """The GGUF of the base checkpoint, or None (also when the checkpoint itself is missing: the
    transformers engine reports that, with its own message, on first use)."""
    try:
        found = describe_checkpoint(base_dir)["gguf_path"]
    except BaseModelError:
        return None
    return Path(found) if found and Path(found).is_file() else None


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (Linux), empty where they cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def use_extra_buffers(setting, flags=None):
    """Whether llama.cpp may put weights in its extra buffer types (EngineConfig.extra_buffers)."""
    if setting != "auto":
        return setting == "on"
    flags = cpu_flags() if flags is None else flags
    return not any(flag.startswith("amx") for flag in flags)


def gguf_with_head(gguf, kind):
    """The path of a copy of `gguf` whose output layer (token_embd / output) is requantised to the
    ggml type `kind` ("q4_0", ...): `<stem>.head-<kind>.gguf` beside it, made once and reused (made again when `gguf` is newer).

    llama_model_quantize with allow_requantize and the file's own ftype (its general.file_type):
    every other tensor keeps its type, so llama.cpp copies its bytes unchanged (checked: on the
    embedded Gemma-3-270M Q4_K_M file only token_embd differs, byte for byte; the f32 tiny model
    likewise), and the copy is refused if any other tensor's type changed. The copy is written to
    a temporary file in the same folder and renamed into place, so a process racing to make the
    same copy never sees half a file. Raises EngineError, leaving nothing behind, when the file
    cannot be read as a GGUF, the rows do not split into `kind`'s blocks (llama.cpp would abort
    the process), or the quantisation fails; llama.cpp's messages go where the caller routed its log.
    """
    import llama_cpp  # noqa: PLC0415  (imported on use, as in load())
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader  # noqa: PLC0415

    gguf = Path(gguf)
    target = gguf.with_name(f"{gguf.stem}.head-{kind}.gguf")
    if target.is_file() and target.stat().st_mtime >= gguf.stat().st_mtime:
        return target  # made from this file (a GGUF replaced since is newer than its old copy)
    try:
        ggml_type = GGMLQuantizationType[kind.upper()]
    except KeyError:
        raise EngineError(f"{kind!r} is not a ggml type") from None
    try:
        reader = GGUFReader(gguf)
        tensors = {tensor.name: tensor for tensor in reader.tensors}
        ftype = int(reader.fields["general.file_type"].parts[-1][0])
    except (OSError, ValueError, KeyError) as error:
        raise EngineError(f"cannot requantise the output layer of {gguf}: not a GGUF with a general.file_type ({error})") from error
    block = GGML_QUANT_SIZES[ggml_type][0]
    for name in HEAD_TENSORS:
        if name in tensors and int(tensors[name].shape[0]) % block:
            raise EngineError(f"{name} of {gguf} has rows of {int(tensors[name].shape[0])} values, not whole {kind} blocks of {block}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.token_embedding_type = params.output_tensor_type = int(ggml_type)
    params.nthread = os.cpu_count() or 1
    handle, partial = tempfile.mkstemp(dir=gguf.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    try:
        llama_cpp.llama_backend_init()
        if llama_cpp.llama_model_quantize(str(gguf).encode(), partial.encode(), ctypes.byref(params)) != 0:
            raise EngineError(f"llama.cpp could not requantise the output layer of {gguf} to {kind} (see its log)")
        changed = [
            tensor.name
            for tensor in GGUFReader(partial).tensors
            if tensor.name not in HEAD_TENSORS and tensor.tensor_type != tensors[tensor.name].tensor_type
        ]
        if changed:
            raise EngineError(f"requantising the output layer of {gguf} changed other tensors too: {', '.join(changed)}")
        os.chmod(partial, gguf.stat().st_mode & 0o777)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    logger.info("requantised the output layer of %s to %s: %s", gguf.name, kind, target)
    return target


@contextlib.contextmanager
def raw_llama_as_served():
    """While it lasts, `llama_cpp.Llama` (llama-cpp-python's own high-level class, which tests and
    benchmarks compare the engine with) loads models with the engine's extra-buffer rule: it has
    no switch of its own and takes its model params from llama_model_default_params()."""
    import llama_cpp  # noqa: PLC0415  (only whoever compares with raw llama-cpp-python pays for it)

    bindings = llama_cpp.llama_cpp
    default = bindings.llama_model_default_params

    def params():
        made = default()
        made.use_extra_bufts = use_extra_buffers("auto")
        return made

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


def _log_to_python(level, text, user_data):
    # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings such as "cannot use
    # buft 'CPU_REPACK'" on every LoRA load are harmless: only errors are worth more than debug.
    message = text.decode("utf-8", "replace").rstrip()
    if message:
        llama_logger.log(logging.ERROR if level == 4 else logging.DEBUG, "%s", message)


_log_callback = None  # the ctypes callback must outlive every call into llama.cpp


def _route_llama_logs(llama_cpp):
    global _log_callback
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(_log_to_python)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def quantisation_name(llama_cpp, ftype):
    """"Q4_K_M" for LLAMA_FTYPE_MOSTLY_Q4_K_M, "F32" for LLAMA_FTYPE_ALL_F32, ..."""
    for name, value in vars(llama_cpp).items():
        if name.startswith("LLAMA_FTYPE_") and value == ftype and name != "LLAMA_FTYPE_GUESSED":
            return name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
    return f"ftype {ftype}"


class _Context:
    """One llama context: the KV cache, batch and sequence ids of the requests of one adapter version."""

    def __init__(self, llama_cpp, handle, capacity, sequences):
        self.handle = handle
        self.memory = llama_cpp.llama_get_memory(handle)
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.free = list(range(sequences - 1, -1, -1))  # sequence ids not in use; pop() takes 0 first
        self.sequences = sequences
        self.rows = []  # sequences decoding in it (their prompt is in the cache)

    @property
    def idle(self):
        return len(self.free) == self.sequences


class LlamaCppEngine(LocalEngine):
    backend = "llamacpp"
    adapter_file = "adapter.gguf"
    adapter_hint = "; `python manage.py export_gguf_adapters` writes it"

    def __init__(self, config, **options):
        super().__init__(config, **options)
        self.gguf_path = None
        self._llama = self._numpy = self._torch = None  # modules, imported by load()
        self._model = None  # llama_model *
        self._n_vocab = 0
        self._threads = config.threads or os.cpu_count() or 1
        self._contexts = {}  # adapter name (None = base model) -> _Context
        self._loras = {}  # adapter name -> llama_adapter_lora *

    def weight_bytes(self):
        """(bytes of weights one decode step reads, the LoRA part of them): the base GGUF's tensors
        plus the GGUF LoRA of each adapter in use."""
        lora = sum((self.adapters.path(name) / self.adapter_file).stat().st_size for name in self.adapters.loaded_names())
        return self._llama.llama_model_size(self._model) + lora, lora

    # -----------------------------------------------------------------------------------------
    # loading

    def _load_model(self):
        import llama_cpp
        import numpy
        import torch
        from transformers import AutoTokenizer

        gguf = base_gguf(self.config.base_dir)
        if gguf is None:
            raise BaseModelError(
                f"the base model {str(self.config.base_dir)!r} has no GGUF file (*.gguf or gguf/*.gguf) for llama.cpp"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.config.base_dir, local_files_only=True, trust_remote_code=self.config.trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise BaseModelError(f"cannot load the tokenizer of {str(self.config.base_dir)!r}: {error}") from error
        _route_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        head = ""
        if self.config.head_type:
            gguf = gguf_with_head(gguf, self.config.head_type)
            head = f" with a {self.config.head_type} output layer"
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0  # the CPU fast path; GPUs serve through transformers
        params.use_extra_bufts = use_extra_buffers(self.config.extra_buffers)
        model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
        if not model:
            raise EngineError(f"llama.cpp cannot load {gguf} (see the llm.engine.llama_cpp log)")
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            self._check_vocabulary(llama_cpp, vocab, tokenizer, gguf)
            self._use_tokenizer(tokenizer, llama_cpp.llama_model_n_ctx_train(model))
            if self.config.max_active > llama_cpp.llama_max_parallel_sequences():
                raise ValueError(
                    f"max_active={self.config.max_active} is more than the "
                    f"{llama_cpp.llama_max_parallel_sequences()} sequences llama.cpp decodes together"
                )
        except BaseException:
            llama_cpp.llama_model_free(model)
            raise
        self._llama, self._model, self.gguf_path = llama_cpp, model, gguf
        self._numpy, self._torch = numpy, torch
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.device = "cpu"
        self.dtype = quantisation_name(llama_cpp, llama_cpp.llama_model_ftype(model))
        self.dtype_reason = f"the quantisation of {gguf.name}{head}, on {self._threads} CPU threads"
        if self.adapters.current is None:
            self._contexts[None] = self._new_context(None)

    def _check_vocabulary(self, llama_cpp, vocab, tokenizer, gguf):
        """Refuse a GGUF whose tokenizer turns the probe conversation into other ids than the checkpoint's,
        in each prompt format this engine may serve (Gemma's, and the checkpoint's chat template when
        it has one: its markers are special tokens the vocabulary must know too)."""
        turns = [Turn(role, body) for role, body in PROBE_TURNS]
        for prompt_format in dict.fromkeys([PromptFormat.GEMMA, prompt_format_for(tokenizer)]):
            text = render_conversation(turns, system=PROBE_SYSTEM, prompt_format=prompt_format, tokenizer=tokenizer)
            expected = encode_prompt(tokenizer, text, prompt_format)
            data = text.encode("utf-8")
            room = len(data) + 8
            ids = (llama_cpp.llama_token * room)()
            # add_special as the format encodes (a template writes its own BOS); parse_special: the
            # markers in the text are special tokens, as the Hugging Face tokenizer reads them.
            count = llama_cpp.llama_tokenize(vocab, data, len(data), ids, room, prompt_format.adds_special_tokens, True)
            got = list(ids[: max(count, 0)])
            if got != expected:
                raise EngineError(
                    f"{gguf} does not tokenise like the checkpoint's tokenizer, so it is not the same model's "
                    f"vocabulary: {text!r} is {expected} with transformers but {got} with llama.cpp"
                )

    def _new_context(self, lora):
        """Under _model_lock (or while loading): a context for K sequences, with `lora` applied."""
        llama_cpp, config = self._llama, self.config
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = config.max_active
        # One KV buffer shared by the sequences (llama.cpp masks each token to its own sequence's
        # cells). Measured on Gemma-3-270M, 2 cores: 8 chats decode 1.6x faster than with a KV
        # stream per sequence (kv_unified off); a single chat is as fast either way.
        params.kv_unified = True
        # Each sequence's cells (llama.cpp pads a context to 256 cells; a per-sequence multiple of
        # 256 keeps n_ctx divisible by n_seq_max).
        params.n_ctx = config.max_active * math.ceil((self._prompt_budget + config.max_new_tokens) / 256) * 256
        # One ubatch per step: every sequence's last token plus a prefill chunk. Drafts take their
        # room from the prefill chunk (_plan), not from a larger ubatch: the ubatch size changes
        # llama.cpp's kernels and so the logits (a memorised pick flipped on the tiny model).
        params.n_batch = params.n_ubatch = config.prefill_chunk + config.max_active
        params.n_threads = params.n_threads_batch = self._threads
        # Sliding-window layers keep only their window (Gemma 3: 512 positions). Rewinding a
        # rejected draft is safe with it: this llama.cpp prunes nothing after a batch; a cell
        # is only overwritten when `find_slot` places a later ubatch, and only if it is masked
        # for the sequence's next position (llama_kv_cache::find_slot: `is_masked_swa(pos_cell,
        # seq_pos_max + 1)`). A draft fed at p..p+d thus overwrites no cell that p + 1, the
        # earliest position a rewind leaves next, still sees. Measured on Gemma-3-270M with a
        # 768-cell window cache: 400 drafts of 8 rewound to 2 kept tokens each, to position
        # 1700, and before every next token its whole window was still in the cache.
        params.swa_full = False
        params.no_perf = True
        handle = llama_cpp.llama_init_from_model(self._model, params)
        if not handle:
            raise EngineError(f"llama.cpp cannot make a context of {params.n_ctx} tokens (see the llm.engine.llama_cpp log)")
        if lora is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
            scales = (ctypes.c_float * 1)(1.0)  # llama.cpp applies alpha / rank itself: PEFT's scaling
            if llama_cpp.llama_set_adapters_lora(handle, adapters, 1, scales) != 0:
                llama_cpp.llama_free(handle)
                raise EngineError("llama.cpp refused to apply the LoRA adapter to a context")
        return _Context(llama_cpp, handle, params.n_batch, config.max_active)

    def _free_context(self, context):
        self._llama.llama_batch_free(context.batch)
        self._llama.llama_free(context.handle)

    def _unload_model(self):
        with self._model_lock:
            if self._model is None:
                return
            for context in self._contexts.values():
                self._free_context(context)
            for lora in self._loras.values():
                self._llama.llama_adapter_lora_free(lora)
            self._contexts.clear()
            self._loras.clear()
            self._llama.llama_model_free(self._model)
            self._model = None
            self._loaded = False  # load() now says the engine is closed

    def metrics(self):
        metrics = super().metrics()
        # The versions holding a llama context (None: the base model's), and the threads decoding.
        metrics["contexts"] = sorted(list(self._contexts), key=lambda name: (name is not None, name or ""))
        metrics["threads"] = self._threads
        return metrics

    # -----------------------------------------------------------------------------------------
    # adapters

    def _load_adapter_weights(self, name, path):
        """Under the model lock: load the adapter's GGUF LoRA and give it a context."""
        if self._model is None:
            raise EngineError("the engine is closed")
        path = path / self.adapter_file
        if not path.is_file():  # removed since it was read
            raise FileNotFoundError(f"{str(path)!r} is missing{self.adapter_hint}")
        lora = self._llama.llama_adapter_lora_init(self._model, str(path).encode())
        if not lora:
            raise ValueError(f"llama.cpp cannot load the LoRA {str(path)!r} (see the llm.engine.llama_cpp log)")
        try:
            context = self._new_context(lora)
        except BaseException:
            self._llama.llama_adapter_lora_free(lora)
            raise
        self._loras[name], self._contexts[name] = lora, context
        logger.info("adapter %s loaded from %s", name, path)

    def _unload_adapter_weights(self, name):
        # Free order: the context that applies the LoRA, then the LoRA (the model outlives both).
        context = self._contexts.pop(name, None)
        if context is not None:
            self._free_context(context)
        lora = self._loras.pop(name, None)
        if lora is not None:
            self._llama.llama_adapter_lora_free(lora)

    # -----------------------------------------------------------------------------------------
    # the decode thread

    def _has_rows(self):
        return any(context.rows for context in list(self._contexts.values())) or self._base_context_unused()

    def _base_context_unused(self):
        base = self._contexts.get(None)
        return (
            base is not None and base.idle and self.adapters.current is not None
            and not any(sequence.adapter is None for sequence in self.scheduler.prefilling)
        )

    def _rows(self):
        return [sequence for context in list(self._contexts.values()) for sequence in context.rows]

    def _clear_rows(self):
        for context in list(self._contexts.values()):
            context.rows.clear()

    def _free_slot(self, sequence):
        slot, sequence.slot = sequence.slot, None
        if slot is None:
            return
        context, seq_id = slot
        with self._model_lock:
            self._llama.llama_memory_seq_rm(context.memory, seq_id, -1, -1)
        if sequence in context.rows:
            context.rows.remove(sequence)
        context.free.append(seq_id)

    def _step(self):
        with self._model_lock, self.scheduler.lock:
            if self._base_context_unused():  # the base model's context after a swap to an adapter
                self._free_context(self._contexts.pop(None))
        for context in list(self._contexts.values()):
            for sequence in list(context.rows):
                reason = self._reason_to_end(sequence)
                if reason:
                    self._finish(sequence, reason)
        plans = self._plan()
        if not plans:
            return
        results = []  # (sequence, fed tokens, greedy or sampled tokens after them, error)
        with self._model_lock:
            for context, entries in plans.items():
                results += self._decode(context, entries)
        decoded = {}
        for sequence, fed, predicted, error in results:
            if error:
                if sequence in self.scheduler.prefilling:
                    self._end_prefill(sequence, ERROR, error=error)
                else:
                    self._finish(sequence, ERROR, error=error)
            elif sequence.phase != RUNNING:  # finished while the step ran
                continue
            elif sequence.prefilled < len(sequence.prompt_ids):  # a prompt chunk
                sequence.prefilled += len(fed)
                sequence.position = sequence.prefilled
                if predicted:  # the prompt is complete: its first token
                    self._end_prefill(sequence, None)
                    context = sequence.slot[0]
                    if self._accept(sequence, predicted[0]):
                        context.rows.append(sequence)
            else:  # a decode row: the last token, then its draft
                context, seq_id = sequence.slot
                decoded[id(context)] = decoded.get(id(context), 0) + 1
                kept, alive = self._accept_verified(sequence, predicted, fed[1:])  # finishing frees the slot
                sequence.position += kept
                if alive and kept < len(fed):  # the rejected draft tokens leave the cache
                    with self._model_lock:
                        self._llama.llama_memory_seq_rm(context.memory, seq_id, sequence.position, -1)
        if decoded:
            self.counters.step(max(decoded.values()))

    def _plan(self):
        """{context: [(sequence, token ids, first position, outputs)]}: every decoding sequence's
        last token and, while no newcomer waits for its prefill, its draft (logits for each); then
        prompt chunks of newcomers, `prefill_chunk` tokens in all (logits for the last token of a
        complete prompt)."""
        # The batch holds prefill_chunk + max_active tokens: each decoding sequence's last token,
        # then the prompt chunks of newcomers or, while none is prefilling, drafts. A newcomer's
        # first token comes before the running chats' drafts: measured with 16 grounded chats
        # started at once, drafts sharing the step with prefills took p95 first token from 8.5 s
        # to 12.5 s (benchmarks/README.md, "Prompt-lookup drafting").
        # Nor while more than DRAFT_MAX_DECODING chats decode: the batch is compute-bound there and
        # each verified token adds a row of the output layer (measured on an idle 2-core EPYC:
        # drafting gave 1.10x the tokens/s at 8 chats and 0.83x at 16).
        plans = {}
        decoding = sum(len(context.rows) for context in self._contexts.values())
        with self.scheduler.lock:
            waiting = self.scheduler.prefilling or self.scheduler.waiting
        drafts_room = 0 if waiting or decoding > DRAFT_MAX_DECODING else self.config.prefill_chunk
        for context in list(self._contexts.values()):
            for sequence in context.rows:
                draft = self._draft(sequence)[:drafts_room] if drafts_room else []
                drafts_room -= len(draft)
                fed = [sequence.last, *draft]
                plans.setdefault(context, []).append((sequence, fed, sequence.position, len(fed)))
        budget = self.config.prefill_chunk
        for sequence in self._prefill_queue():
            if budget <= 0:
                break
            if sequence.slot is None:
                try:
                    sequence.slot = self._take_sequence(sequence.adapter)
                except EngineError as error:
                    self._end_prefill(sequence, ERROR, error=str(error))
                    continue
                self._start_output(sequence)
            ids = sequence.prompt_ids
            chunk = ids[sequence.prefilled : sequence.prefilled + budget]
            budget -= len(chunk)
            complete = sequence.prefilled + len(chunk) == len(ids)
            plans.setdefault(sequence.slot[0], []).append((sequence, chunk, sequence.prefilled, int(complete)))
        return plans

    def _take_sequence(self, adapter):
        """(context, sequence id) for a sequence starting its prefill; the base context is made on demand."""
        with self._model_lock:
            context = self._contexts.get(adapter)
            if context is None:
                if adapter is not None:  # its context exists from the moment it was loaded
                    raise EngineError(f"adapter {adapter!r} has no llama.cpp context")
                context = self._contexts[None] = self._new_context(None)
        return context, context.free.pop()

    def _decode(self, context, entries):
        """Under the model lock: one llama_decode of `entries` in `context`; [(sequence, tokens,
        the next token after each of the last `outputs` of them, error)]."""
        llama_cpp, batch = self._llama, context.batch
        count = 0
        for sequence, tokens, start, outputs in entries:
            seq_id = sequence.slot[1]
            first_output = len(tokens) - outputs
            for offset, token in enumerate(tokens):
                batch.token[count] = token
                batch.pos[count] = start + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = seq_id
                batch.logits[count] = offset >= first_output
                count += 1
        batch.n_tokens = count
        status = llama_cpp.llama_decode(context.handle, batch)
        if status != 0:
            logger.error("llama_decode returned %d for %d sequences", status, len(entries))
            return [(sequence, tokens, [], f"llama_decode returned {status}") for sequence, tokens, _, _ in entries]
        results = []
        end = 0  # batch index after the entry's last token
        for sequence, tokens, _, outputs in entries:
            end += len(tokens)
            predicted = []
            for index in range(end - outputs, end):
                pointer = llama_cpp.llama_get_logits_ith(context.handle, index)
                row = self._numpy.ctypeslib.as_array(pointer, shape=(self._n_vocab,))  # a view, valid until the next decode
                if sequence.temperature <= 0 and not sequence.request.choice_ids:
                    # numpy's argmax is one thread: torch's would wake its OpenMP pool, whose
                    # spinning threads then compete with llama.cpp's for the same cores.
                    predicted.append(int(row.argmax()))
                else:
                    predicted.append(self._next_token(sequence, self._torch.from_numpy(row)))
            results.append((sequence, tokens, predicted, None))
        return results
