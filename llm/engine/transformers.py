"""The transformers inference engine: any Hugging Face checkpoint, GPU or CPU, with PEFT adapters.

    from llm.engine import TransformersEngine, EngineConfig, Turn
    engine = TransformersEngine(EngineConfig(base_dir="var/models/base"))     # loads nothing yet

(`llm.engine.Engine` is the same class, its older name.) The contract (submit/stream/generate,
admission, limits, cancellation, adapters) is `llm.engine.local.LocalEngine`'s; this module is
the torch side of each loop iteration:

  1. prefill newcomers, at most `prefill_chunk` prompt tokens in all, each into its own cache;
     a newcomer whose prompt is complete samples its first token and is spliced into the batch;
  2. run ONE forward for every running sequence (continuous batching: the batch changes at step
     boundaries), sample a token per row, stream the text, and drop the rows that finished.
     A greedy row with a prompt-lookup draft (llm.engine.drafting) feeds its last token and the
     draft in that same forward, and takes every token the model confirms plus the model's own
     next one: the rows feed as many columns as the longest draft (the others padded, masked
     out), the logits of all of them come back, and the columns of rejected drafts are masked
     out of the cache or cropped (llm.engine.batch). Sampled rows take one token, as before;
     a step without drafts is a one-column step. In float32 the greedy answer is token for token
     the undrafted one; in bfloat16 a near-tie (two logits a bf16 step apart) can go either way
     once the forward's shape changes, with drafts as when two chats are batched without them.

Rows may use different adapters: a batch on one adapter runs the plain PEFT forward; a mixed batch
passes PEFT's per-row `adapter_names` (the base model is "__base__"). An adapter that is no longer
current is deleted from the model once the last request bound to it has finished. Nothing here
imports Django; torch is imported by `load()`. (A module named `transformers` inside this
package does not shadow the PyPI one: imports are absolute.)
"""

import logging
import warnings

from llm.engine.events import ERROR
from llm.engine.local import LocalEngine
from llm.finetune.config import FinetuneConfig

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _fresh_input(module, args):
    """LM-head pre-hook: hand the head a freshly allocated copy of its input.

    With LoRA layers injected, the last hidden state reaching the head is a view into a larger
    buffer, and the bf16 GEMV on it took 0.8-3 s on the first token of a prompt (measured: 3.2 s
    with the hook off against 0.22 s with it on, Gemma-3-270M, one CPU). The copy is one row per
    sequence and fed column: microseconds.
    """
    return (args[0].contiguous().clone(), *args[1:])


def _attention_windows(config):
    """({layer type: its sliding window or None} when some layers slide, else None; whether a
    drafted step is exact on this model). Sliding layers need the masks from real positions
    (llm.engine.batch), which the model takes as a dict per layer type, in sdpa's or eager's form."""
    text = config.get_text_config()
    window, types = getattr(text, "sliding_window", None), getattr(text, "layer_types", None)
    if not types:
        return None, not window  # a window on every layer without layer types (Mistral): no dict of masks
    if "sliding_attention" not in types:
        return None, True
    exact = set(types) <= {"full_attention", "sliding_attention"} and config._attn_implementation in ("sdpa", "eager")
    return {name: window if name == "sliding_attention" else None for name in set(types)}, exact


class TransformersEngine(LocalEngine):
    backend = "transformers"

    def __init__(self, config, **options):
        super().__init__(config, **options)
        self._model = None  # the transformers model (LoRA layers injected once an adapter is loaded)
        self._peft = None  # the PeftModel around it, from the first adapter on
        self._peft_selected = None  # the adapter this engine last selected in PEFT for a whole batch
        self._keep_logits = False
        self._cache_kwarg = "past_key_values"
        self._torch = self._batching = None
        self._batch = None
        self._windows = None  # {layer type: sliding window or None} when some layers slide, else None
        self._exact_drafts = True  # whether this model's drafted steps give exactly the undrafted answer

    @property
    def model(self):
        """The loaded transformers model (LoRA layers injected once an adapter is loaded), or None;
        read-only, for measurements such as benchmarks/decode.py."""
        return self._model

    def _load_model(self):
        import inspect

        import torch

        from llm.engine import batch as batching
        from llm.modeling import load_base

        device = batching.resolve_device(self.config.device)
        dtype, reason = batching.resolve_dtype(self.config.dtype, device)
        loader_config = FinetuneConfig(device=str(device), trust_remote_code=self.config.trust_remote_code)
        model, tokenizer = load_base(self.config.base_dir, loader_config)
        model.to(dtype=dtype)
        model.eval()
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_fresh_input)
        self._use_tokenizer(tokenizer, getattr(model.config, "max_position_embeddings", None))
        self._torch, self._batching = torch, batching
        self.device, self.dtype, self.dtype_reason = device, dtype, reason
        parameters = inspect.signature(model.forward).parameters
        self._keep_logits = "logits_to_keep" in parameters
        # transformers 5.24 renamed past_key_values to cache (the old name warns, then goes in 5.40)
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._windows, self._exact_drafts = _attention_windows(model.config)
        if self.config.draft_tokens and not self._exact_drafts:
            logger.info("no drafts on %s: its attention windows are not handled here", self.config.base_dir)
        self._batch = batching.Batch(device)
        self._model = model

    # -----------------------------------------------------------------------------------------
    # adapters

    def _load_adapter_weights(self, name, path):
        """Under the model lock: put the adapter's weights in the model."""
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._model, path, adapter_name=name, is_trainable=False)
        else:
            self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
        self._peft.eval()
        self._peft_selected = None  # loading may change PEFT's active adapter
        logger.info("adapter %s loaded from %s", name, path)

    def _unload_adapter_weights(self, name):
        with warnings.catch_warnings():  # "... was active, setting active adapter to ...": expected
            warnings.simplefilter("ignore", UserWarning)
            self._peft.delete_adapter(name)
        self._peft_selected = None

    # -----------------------------------------------------------------------------------------
    # the decode thread

    def _decoding(self):
        return self._torch.inference_mode()

    def _has_rows(self):
        return bool(self._batch.rows)

    def _rows(self):
        return list(self._batch.rows if self._batch else [])

    def _clear_rows(self):
        if self._batch is not None:
            self._batch.remove(list(self._batch.rows))

    def _step(self):
        self._prefill()
        self._decode_step()

    def _forward(self, adapters, inputs, columns=1):
        """One forward under the model lock; returns the logits of the last `columns` positions,
        [rows, columns, vocab]."""
        if self._keep_logits:
            inputs["logits_to_keep"] = columns
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
        return output.logits[:, -columns:, :]

    def _prefill(self):
        """Prefill waiting prompts, `prefill_chunk` tokens in all; complete ones join the batch."""
        budget = self.config.prefill_chunk
        for sequence in self._prefill_queue():
            if budget <= 0:
                break
            ids = sequence.prompt_ids
            if sequence.slot is None:
                sequence.slot = self._batching.new_cache()
                self._start_output(sequence)
            chunk = ids[sequence.prefilled : sequence.prefilled + budget]
            inputs = self._batching.prefill_inputs(chunk, sequence.prefilled, self.device)
            inputs[self._cache_kwarg] = sequence.slot
            try:
                logits = self._forward([sequence.adapter], inputs)[:, -1]
            except Exception as error:
                logger.exception("prefill of request %s failed", sequence.id)
                self._end_prefill(sequence, ERROR, error=f"{type(error).__name__}: {error}")
                continue
            sequence.prefilled += len(chunk)
            budget -= len(chunk)
            if sequence.prefilled < len(ids):
                continue  # the rest in the next iterations, between decode steps
            self._end_prefill(sequence, None)
            sequence.position = len(ids)
            cache, sequence.slot = sequence.slot, None
            if self._accept(sequence, self._next_token(sequence, logits[0])):
                self._batch.add(sequence, cache, len(ids))

    def _decode_step(self):
        """Decode every running row: one token each, or for a row with a draft its last token and
        the draft in the same forward, keeping what the model confirms (module docstring)."""
        batch = self._batch
        ended = [(s, reason) for s in batch.rows if (reason := self._reason_to_end(s))]
        if ended:
            batch.remove([s for s, _ in ended])
            for sequence, reason in ended:
                self._finish(sequence, reason)
        rows = list(batch.rows)
        if not rows:
            return
        drafts = [self._draft(s) for s in rows]
        columns = 1 + max(len(draft) for draft in drafts)
        inputs = batch.step_inputs([[s.last, *draft] for s, draft in zip(rows, drafts)], [s.position for s in rows])
        if self._windows is not None and (columns > 1 or batch.holes):
            inputs["attention_mask"] = self._position_masks(columns)
        inputs[self._cache_kwarg] = batch.cache
        try:
            logits = self._forward([s.adapter for s in rows], inputs, columns)
        except Exception as error:
            # Some layers may hold the new columns and some not: the shared cache is lost.
            logger.exception("decode step failed for %d requests", len(rows))
            self._batch = self._batching.Batch(self.device)
            for sequence in rows:
                self._finish(sequence, ERROR, error=f"{type(error).__name__}: {error}")
            return
        self.counters.step(len(rows))
        greedy = self._sampling.greedy(logits) if any(s.temperature <= 0 for s in rows) else None
        finished, kept = [], []
        for index, (sequence, draft) in enumerate(zip(rows, drafts)):
            reason = self._reason_to_end(sequence)
            if reason:  # cancelled (or out of time) during this step: its tokens are not sent
                finished.append(sequence)
                kept.append(0)
                self._finish(sequence, reason)
                continue
            if sequence.temperature <= 0:
                taken, alive = self._accept_verified(sequence, greedy[index][: len(draft) + 1], draft)
            else:
                taken, alive = 1, self._accept(sequence, self._next_token(sequence, logits[index, 0]))
            sequence.position += taken
            kept.append(taken if alive else 0)
            if not alive:
                finished.append(sequence)
        batch.keep(kept, columns)
        batch.remove(finished)

    def _draft(self, sequence):
        return super()._draft(sequence) if self._exact_drafts else []

    def _position_masks(self, columns):
        """The batch's masks from real positions, per layer type, in the form the attention
        implementation takes: boolean for sdpa, additive (0 / the dtype's minimum) for eager."""
        masks = self._batch.position_masks(self._windows, columns)
        if self._model.config._attn_implementation == "eager":
            lowest = self._torch.finfo(self.dtype).min
            zero = self._torch.zeros((), dtype=self.dtype, device=self.device)
            masks = {name: self._torch.where(mask, zero, lowest) for name, mask in masks.items()}
        return masks
