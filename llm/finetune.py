"""LoRA / QLoRA fine-tuning of a local causal LM on Q&A pairs: a plain module, no Django.

The Django side (the training task) calls `train(config, base_dir, train_records, dev_records,
out_dir)`; this module never calls back except through the `on_progress` and `should_stop`
callables it is given. From a shell:

    from llm.finetune import FinetuneConfig, train
    import json
    records = json.load(open("data/train.json"))
    train(FinetuneConfig(epochs=3), "var/models/base", records, [], "var/runs/demo")

What ends up in out_dir:

    adapter/               the PEFT adapter (save_pretrained) plus finetune_config.json;
                           it appears only when training finished (written aside, then renamed)
    finetune_config.json   the config the adapter was trained with
    metrics.json           loss history, dev loss per epoch, steps, tokens/s, seconds
    checkpoints/step-N/    while training: adapter + optimizer + scheduler + RNG state, each
                           renamed into place only when complete; removed after a successful run

Every example is rendered by `llm.prompting.render_training_example`, the same renderer the
inference engine uses, and the loss is taken on the answer tokens only, which end with the
end-of-turn token so that the model learns to stop (Gemma base otherwise rambles on).

Speed (measured by benchmarks/train_throughput.py): where bf16 runs, the frozen base weights are
held in bf16 and the LoRA weights in fp32; the LM head runs only at answer positions, fused with
the cross-entropy so that no logits are stored; batches group similar lengths; on CPU the LoRA
dropout draws its masks cheaply. None of it changes the loss beyond rounding.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llm.prompting import END, Turn, question_text, render_conversation, render_training_example

# torch, transformers and peft are imported inside the functions that use them: the Django side
# imports this module for FinetuneConfig in every process, and only training workers need them.

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips (prompt and padding)


@dataclass
class FinetuneConfig:
    # LoRA (defaults from the seed tutorial, except target modules: see DESIGN.md)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"  # "all-linear", or comma-separated names like "q_proj,v_proj"
    # optimisation
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 4  # examples per forward pass; lower it first on out-of-memory
    grad_accum: int = 1  # forward passes per optimizer step (effective batch = batch_size * grad_accum)
    epochs: int = 3
    warmup_ratio: float = 0.03  # fraction of all optimizer steps spent ramping the learning rate up
    max_grad_norm: float = 1.0
    max_length: int = 512  # tokens per example, prompt + answer; longer ones lose the answer's tail
    seed: int = 42
    # checkpoints: every N optimizer steps (0 = never); the last `keep_checkpoints` are kept
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # model loading and numerics
    quantization: str = "none"  # "none" or "4bit" (QLoRA: nf4 + double quantisation via bitsandbytes)
    bf16: str = "auto"  # bf16 autocast: "auto" (where the hardware has it), "on", "off"
    # Frozen base weights while training: "auto" (bf16 when bf16 autocast is on), "bf16", "fp32".
    # The LoRA weights and the optimizer state stay fp32 either way; 4-bit bases ignore it.
    base_dtype: str = "auto"
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    trust_remote_code: bool = False  # only for models like ChatGLM3 that ship their own code
    # prompt
    system_prompt: str = ""  # opens every user turn; the engine must serve with the same one

    def __post_init__(self):
        if self.quantization not in ("none", "4bit"):
            raise ValueError(f"quantization must be 'none' or '4bit', not {self.quantization!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be 'auto', 'on' or 'off', not {self.bf16!r}")
        if self.base_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"base_dtype must be 'auto', 'bf16' or 'fp32', not {self.base_dtype!r}")
        for name in ("lora_r", "batch_size", "grad_accum", "epochs", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Build from a saved dict, ignoring keys this version does not know."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


class TrainingCancelled(Exception):
    """Raised by `train` when `should_stop()` returned true; checkpoints stay, no adapter is written."""


class TrainingInterrupted(Exception):
    """Raised by `train` when `should_interrupt()` returned true, after a checkpoint of the step
    reached: resuming loses nothing but the micro-batches of the step that was under way."""


class BaseModelError(OSError):
    """The base model directory is missing or cannot be loaded."""


# ---------------------------------------------------------------------------------------------
# loading


def resolve_device(config):
    import torch

    device = torch.device(config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # device_map wants an index
    return device


def use_bf16(config, device):
    """Whether to autocast to bf16: asked for, or "auto" and the hardware runs it fast."""
    import torch

    if config.bf16 != "auto":
        return config.bf16 == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without AVX-512 bf16 (or AMX) CPU autocast is emulated and slower than fp32.
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def base_weights_dtype(config, device):
    """The dtype the frozen base weights are held in while training.

    In bf16 every matmul reads half the bytes, and autocast no longer re-casts each frozen fp32
    weight on every forward and backward (it caches casts only of weights that require grad).
    Frozen weights lose nothing by it: what is trained, the fp32 LoRA weights, is never rounded.
    """
    import torch

    if config.quantization == "4bit":
        return torch.float32  # bitsandbytes keeps its own compute dtype
    if config.base_dtype == "auto":
        return torch.bfloat16 if use_bf16(config, device) else torch.float32
    return torch.bfloat16 if config.base_dtype == "bf16" else torch.float32


def load_base(model_dir, config=None, *, dtype=None):
    """Load a local base checkpoint directory as (model, tokenizer). Never downloads.

    Non-quantised weights load in `dtype` (fp32 unless told otherwise: inference and evaluation
    load through here too; training asks for `base_weights_dtype`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or FinetuneConfig()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BaseModelError(
            f"base model directory {str(model_dir)!r} is missing or has no config.json; "
            "point it at a local Hugging Face checkpoint (nothing is downloaded)"
        )
    device = resolve_device(config)
    kwargs = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
        if config.quantization == "4bit":
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16(config, device) else torch.float32,
            )
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, quantization_config=quantization, device_map={"": device}, dtype=torch.float32, **kwargs
            )
        else:
            dtype = dtype or torch.float32
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to(device)
    except (OSError, ValueError) as error:
        raise BaseModelError(f"cannot load the base model from {str(model_dir)!r}: {error}") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_adapter(base_dir, adapter_dir, config=None):
    """Load base + a trained adapter as (model, tokenizer), ready for `generate_answer`."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {str(adapter_dir)!r} (adapter_config.json is missing)")
    if config is None:
        saved = adapter_dir / "finetune_config.json"
        config = FinetuneConfig.from_dict(json.loads(saved.read_text())) if saved.is_file() else FinetuneConfig()
    model, tokenizer = load_base(base_dir, config)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# data


def end_of_turn_id(tokenizer):
    """The id that ends an answer: the end-of-turn token when it is one token, else EOS."""
    token_id = tokenizer.convert_tokens_to_ids(END)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return tokenizer.eos_token_id
    return token_id


def stop_token_ids(tokenizer):
    return sorted({i for i in (end_of_turn_id(tokenizer), tokenizer.eos_token_id) if i is not None})


def encode_example(tokenizer, record, config):
    """Tokenise one Q&A record as prompt + answer with labels on the answer only.

    Returns dict(input_ids, labels, truncated), or None when truncation left no answer token.
    """
    prompt, completion = render_training_example(
        record["instruction"], record.get("input", ""), record["output"], system=config.system_prompt
    )
    # The answer's last id must be the end-of-turn id itself: it is what generation stops on.
    # The newline that the renderer puts after it belongs to the next turn, not to this answer.
    answer_text = completion.removesuffix(END + "\n")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    input_ids = (prompt_ids + answer_ids)[: config.max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[: config.max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    truncated = len(prompt_ids) + len(answer_ids) > config.max_length
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def collate(examples, pad_id):
    """Pad a batch to its longest example (dynamic padding); padding gets no loss."""
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    input_ids, labels, attention = [], [], []
    for example in examples:
        pad = width - len(example["input_ids"])
        input_ids.append(example["input_ids"] + [pad_id] * pad)
        labels.append(example["labels"] + [IGNORE_INDEX] * pad)
        attention.append([1] * len(example["input_ids"]) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(attention),
    }


def length_grouped_batches(lengths, batch_size, seed):
    """Batches of indices whose examples have similar lengths, in a seeded random order.

    Shuffle, then sort within windows of 16 batches: padding stays small, and the batches
    still differ between epochs (the seed includes the epoch).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# model pieces


def add_lora(model, config):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.quantization == "4bit":
        # Casts norms to fp32 and turns on gradient checkpointing: what makes 4-bit training stable.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    targets = config.target_modules.strip()
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    # peft already upcasts adapters on a bf16 base (autocast_adapter_dtype); make it a guarantee:
    # updates of lr x grad are far below a bf16 weight's resolution and would round to nothing.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


@functools.cache
def _fast_dropout_class():
    """The Dropout subclass behind `use_fast_lora_dropout` (built on first use: torch loads lazily)."""
    import torch

    class FastDropout(torch.nn.Dropout):
        """Dropout whose mask takes 16 random bits per element, four per 64-bit draw.

        torch's CPU bernoulli_ draws a 32-bit number per element on one thread (~5 ns each):
        on the seven LoRA inputs of every layer that was a tenth of a Gemma-270M step. The drop
        probability is rounded to a multiple of 1/32768 (0.05 -> 0.04999) and the scale follows.
        The RNG is torch's default generator, so seeding and checkpointed RNG state still apply.
        """

        def __init__(self, p):
            super().__init__(p)
            self.threshold = round(p * 32768)
            self.scale = 1 / (1 - self.threshold / 32768)

        def forward(self, x):
            import torch

            if not self.training or self.threshold == 0:
                return x
            n = x.numel()
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # 63 random bits
            bits = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF  # 15 uniform bits each
            return torch.where(bits >= self.threshold, x * self.scale, 0)

    return FastDropout


def use_fast_lora_dropout(model):
    """Swap the nn.Dropout on the LoRA inputs for FastDropout (same p; CPU training only)."""
    import torch

    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    dropouts[name] = _fast_dropout_class()(dropout.p)


def lora_input_casts_off(model, active):
    """Under bf16 autocast, keep peft from casting each LoRA input to fp32 (the LoRA weights' dtype).

    Autocast casts it straight back to bf16 for the LoRA matmuls: two copies of every LoRA
    input, forward and backward, for nothing. Without autocast the cast is needed and stays.
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=active)


def linear_schedule(optimizer, warmup_steps, total_steps):
    """Linear warmup to the base learning rate, then linear decay to zero."""
    import torch

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def dropout_off(model):
    """Switch dropout off for a loss-only forward, leaving every other module in its mode.

    model.eval() would do it too, but bitsandbytes repacks 4-bit weights for CPU inference on an
    eval-mode forward (with AVX-512 bf16), after which those layers cannot train any more.
    """
    import torch

    switched = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training]
    for module in switched:
        module.eval()
    try:
        yield
    finally:
        for module in switched:
            module.train()


def answer_head_parts(model):
    """(decoder, lm_head, softcap) of a causal LM, PEFT-wrapped or not, or None where not found.

    For the usual `*ForCausalLM` (Llama, Qwen2, Gemma, Mistral, ...) the logits are
    lm_head(decoder(...).last_hidden_state), soft-capped by Gemma 2/3 configs that say so.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base or not callable(head):
        return None
    return decoder, head, getattr(base.config, "final_logit_softcapping", None)


@functools.cache
def _head_cross_entropy():
    """The autograd Function behind `head_cross_entropy` (built on first use: torch loads lazily)."""
    import torch

    class HeadCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, need_grad, row_chunk, vocab_chunk):
            n, vocab = hidden.shape[0], weight.shape[0]
            losses = hidden.new_empty(n, dtype=torch.float32)
            grad = hidden.new_empty(hidden.shape, dtype=torch.float32) if need_grad else None
            row_chunk = math.ceil(n / math.ceil(n / row_chunk))  # even chunks: each streams all of W
            for r0 in range(0, n, row_chunk):
                h, y = hidden[r0 : r0 + row_chunk], labels[r0 : r0 + row_chunk]
                rows = h.shape[0]
                top = h.new_full((rows,), -math.inf, dtype=torch.float32)  # running max logit
                total = h.new_zeros(rows, dtype=torch.float32)  # running sum of exp(logit - top)
                target = h.new_zeros(rows, dtype=torch.float32)
                acc = h.new_zeros((rows, hidden.shape[1]), dtype=torch.float32) if need_grad else None
                for v0 in range(0, vocab, vocab_chunk):
                    w = weight[v0 : v0 + vocab_chunk]
                    z = torch.nn.functional.linear(h, w).float()  # rounded like the plain head's logits
                    offset = y - v0
                    inside = (offset >= 0) & (offset < w.shape[0])
                    picked = z.gather(1, offset.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
                    target = torch.where(inside, picked, target)
                    new_top = torch.maximum(top, z.amax(dim=1))
                    rescale = torch.exp(top - new_top)
                    z.sub_(new_top[:, None]).exp_()
                    total = total * rescale + z.sum(dim=1)
                    if need_grad:
                        acc.mul_(rescale[:, None]).add_(torch.mm(z.to(w.dtype), w))
                    top = new_top
                losses[r0 : r0 + rows] = top + torch.log(total) - target
                if need_grad:
                    # d loss / d h = softmax(logits) @ W - W[y]
                    grad[r0 : r0 + rows] = acc / total[:, None] - weight[y].float()
            ctx.save_for_backward(grad)
            ctx.hidden_dtype = hidden.dtype
            return losses

        @staticmethod
        def backward(ctx, grad_losses):
            (grad,) = ctx.saved_tensors
            return (grad * grad_losses[:, None]).to(ctx.hidden_dtype), None, None, None, None, None

    return HeadCrossEntropy


def head_cross_entropy(hidden, head, labels, *, softcap=None, reduction="mean", row_chunk=512, vocab_chunk=4096):
    """cross_entropy(head(hidden), labels) for the rows of `hidden`, without storing the logits.

    The logits of a 262k vocabulary are 1 MB per row in fp32: materialised, then cast, normalised,
    zero-filled for the gradient and cast back, they cost as much time as the head's matmuls. Here
    the vocabulary is walked in cache-sized chunks with an online softmax, as flash attention walks
    its keys (a running max and sum per row), and the gradient w.r.t. the hidden rows,
    softmax @ W - W[y], is accumulated in the same pass, rescaled whenever the running max moves.
    Same FLOPs, same numbers up to rounding. Used for a frozen bias-free linear head without
    soft-capping; anything else takes the plain head and cross-entropy.
    """
    import torch

    weight = getattr(head, "weight", None)
    plain = (
        softcap
        or not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or weight.requires_grad
        or hidden.shape[0] == 0
    )
    if plain:
        logits = head(hidden)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction=reduction)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    losses = _head_cross_entropy().apply(hidden, weight, labels, need_grad, row_chunk, vocab_chunk)
    return losses.mean() if reduction == "mean" else losses.sum()


def answer_loss(model, batch, parts=None, *, reduction="mean"):
    """Cross-entropy of a collated batch on its labelled (answer) tokens only.

    The logits at position t predict the token at t + 1. With `parts` (see answer_head_parts),
    the LM head runs only at the positions whose next token is labelled: the loss reads nothing
    else, so it is exact, and for a 262k vocabulary the head is most of the model's FLOPs and
    its logits most of the memory traffic. Without parts, the model's own forward gives logits
    everywhere and the same rows are picked afterwards.
    """
    import torch

    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    else:
        decoder, head, softcap = parts
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, return_dict=True
        ).last_hidden_state
        return head_cross_entropy(hidden[:, :-1][keep], head, labels[keep], softcap=softcap, reduction=reduction)
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction=reduction)


def checked_answer_head(model, example, pad_id, device, bf16):
    """answer_head_parts(model) if they give the model's own loss on `example`, else None.

    Some architectures scale or post-process their logits in ways this module does not know
    (logit_scale, logits_scaling, remote code, ...); one comparison on a short example catches
    that, and training then falls back to the plain full-logits forward.
    """
    import torch

    parts = answer_head_parts(model)
    if parts is None:
        return None
    batch = {key: value.to(device) for key, value in collate([example], pad_id).items()}
    # Without dropout: no noise between the two, and no RNG draws that would shift the run's masks.
    try:
        with (
            torch.no_grad(),
            dropout_off(model),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            lora_input_casts_off(model, bf16),
        ):
            fast = answer_loss(model, batch, parts).item()
            full = answer_loss(model, batch).item()
    except (TypeError, AttributeError, RuntimeError, ValueError):
        return None  # the decoder does not take the usual arguments
    # The same numbers up to summation order: 3e-6 apart on Gemma-3-270M in bf16.
    return parts if math.isclose(fast, full, rel_tol=1e-3, abs_tol=1e-5) else None


def dev_loss(model, examples, batch_size, pad_id, device, bf16, parts=None):
    """Mean loss per answer token over the dev examples."""
    import torch

    total, tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        with (
            torch.no_grad(),
            dropout_off(model),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            lora_input_casts_off(model, bf16),
        ):
            total += answer_loss(model, batch, parts, reduction="sum").item()
        tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(1, tokens)


# ---------------------------------------------------------------------------------------------
# checkpoints


def data_fingerprint(config, records):
    """What a checkpoint must match to be resumed: the data and every setting but bookkeeping."""
    bookkeeping = ("checkpoint_every", "keep_checkpoints", "device")
    settings = {k: v for k, v in config.to_dict().items() if k not in bookkeeping}
    payload = json.dumps([settings, records], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def list_checkpoints(out_dir):
    """Complete checkpoints as [(step, path)], oldest first. Temp dirs never match "step-N"."""
    root = Path(out_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            name = path.name
            if name.startswith("step-") and name[5:].isdigit() and (path / "trainer_state.pt").is_file():
                found.append((int(name[5:]), path))
    return sorted(found)


def rng_state():
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step, model, optimizer, scheduler, state, keep):
    import torch

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    with removed_on_error(tmp):
        model.save_pretrained(tmp / "adapter")
        torch.save(
            {
                **state,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            },
            tmp / "trainer_state.pt",
        )
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic: a checkpoint dir named step-N is always complete
    if keep > 0:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(path):
    import torch

    # weights_only: a checkpoint holds tensors, numbers and lists; refuse anything executable.
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True)


def restore_checkpoint(path, state, model, optimizer, scheduler):
    """Put the adapter weights, optimizer, schedule and RNG of a checkpoint back in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(Path(path) / "adapter" / "adapter_model.safetensors")
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


@contextlib.contextmanager
def removed_on_error(tmp):
    """Remove a half-written temp file or folder when writing it fails (a full disk, most often):
    a failed run keeps its folder for a resume, and that must not carry the dead weight."""
    try:
        yield
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def remove_leftovers(out_dir):
    """Half-written adapters and checkpoints of a crashed run: never complete, never read."""
    for pattern in (".adapter-*", "checkpoints/.tmp-step-*"):
        for path in Path(out_dir).glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def write_json(path, data):
    """Write JSON atomically (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with removed_on_error(tmp):
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# training


def train(
    config, base_dir, train_records, dev_records, out_dir, *, on_progress=None, should_stop=None, should_interrupt=None,
    resume=True,
):
    """Fine-tune a LoRA adapter on base_dir with train_records; write it to out_dir/adapter.

    on_progress(dict) is called after every optimizer step with step, total_steps, epoch, loss,
    lr, elapsed_s, eta_s, and dev_loss at the end of each epoch. should_stop() is checked before
    every forward pass; when it returns true, TrainingCancelled is raised (checkpoints are kept,
    no adapter is written). should_interrupt() is checked after every optimizer step; when it
    returns true, a checkpoint of that step is saved (whatever checkpoint_every says) and
    TrainingInterrupted is raised. With resume, training continues from the last complete
    checkpoint in out_dir/checkpoints. Returns the metrics dict that is also saved as metrics.json.
    """
    _, _, metrics = train_model(
        config, base_dir, train_records, dev_records, out_dir,
        on_progress=on_progress, should_stop=should_stop, should_interrupt=should_interrupt, resume=resume,
    )
    return metrics


def train_model(
    config, base_dir, train_records, dev_records, out_dir, *, on_progress=None, should_stop=None, should_interrupt=None,
    resume=True,
):
    """`train`, returning (model, tokenizer, metrics): evaluate in the same process without reloading.

    The model comes back with its base weights in the training dtype (bf16 where bf16 is used,
    as the chat engine serves them on such hardware).
    """
    import torch

    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_records = [dict(r) for r in train_records]
    dev_records = [dict(r) for r in dev_records or []]
    fingerprint = data_fingerprint(config, train_records)
    if not resume:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    remove_leftovers(out_dir)

    random.seed(config.seed)
    torch.manual_seed(config.seed)  # LoRA A matrices and dropout masks
    device = resolve_device(config)
    bf16 = use_bf16(config, device)
    model, tokenizer = load_base(base_dir, config, dtype=base_weights_dtype(config, device))
    model = add_lora(model, config)
    if device.type == "cpu":
        use_fast_lora_dropout(model)
    model.config.use_cache = False  # the cache only costs memory while training

    encoded = [encode_example(tokenizer, r, config) for r in train_records]
    train_examples = [e for e in encoded if e is not None]
    if not train_examples:
        raise ValueError("no training example has an answer token left (empty data, or max_length too small)")
    dev_examples = [e for e in (encode_example(tokenizer, r, config) for r in dev_records) if e is not None]
    lengths = [len(e["input_ids"]) for e in train_examples]
    pad_id = tokenizer.pad_token_id

    micro_batches_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(total_steps * config.warmup_ratio)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)

    step = 0
    history = {"train_loss": [], "dev_loss": [], "tokens": 0, "answer_tokens": 0, "seconds": 0.0}
    resumed_from = None
    checkpoints = list_checkpoints(out_dir) if resume else []
    if checkpoints:
        resumed_from, path = checkpoints[-1]
        state = read_checkpoint_state(path)
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint {str(path)!r} was made with other data or settings; "
                "train with resume=False (or into a fresh out_dir) to start over"
            )
        restore_checkpoint(path, state, model, optimizer, scheduler)
        step, history = state["step"], state["history"]

    def report(**info):
        if on_progress is not None:
            on_progress(info)

    def check_stop():
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training cancelled at step {step} of {total_steps}")

    model.train()
    shortest = train_examples[lengths.index(min(lengths))]
    parts = checked_answer_head(model, shortest, pad_id, device, bf16)  # None: full logits everywhere
    session_start, session_first_step = time.monotonic(), step
    for epoch in range(step // steps_per_epoch, config.epochs):
        batches = length_grouped_batches(lengths, config.batch_size, config.seed + epoch)
        groups = [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
        # On resume, skip the optimizer steps of this epoch that the checkpoint already holds.
        for group in groups[step - epoch * steps_per_epoch :]:
            step_loss, step_tokens, step_answer_tokens = 0.0, 0, 0
            for indices in group:
                check_stop()
                batch = collate([train_examples[i] for i in indices], pad_id)
                batch = {key: value.to(device) for key, value in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), lora_input_casts_off(model, bf16):
                    loss = answer_loss(model, batch, parts) / len(group)
                loss.backward()
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
                step_answer_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["train_loss"].append(step_loss)
            history["tokens"] += step_tokens
            history["answer_tokens"] += step_answer_tokens

            info = {"step": step, "total_steps": total_steps, "epoch": epoch + 1, "loss": step_loss, "lr": lr}
            if step % steps_per_epoch == 0 and dev_examples:
                info["dev_loss"] = dev_loss(model, dev_examples, config.batch_size, pad_id, device, bf16, parts)
                history["dev_loss"].append(info["dev_loss"])
            elapsed = time.monotonic() - session_start
            per_step = elapsed / (step - session_first_step)
            report(**info, elapsed_s=elapsed, eta_s=per_step * (total_steps - step))

            if step == total_steps:
                continue  # what follows the last step is the adapter itself, not a checkpoint
            interrupted = should_interrupt is not None and should_interrupt()
            if interrupted or (config.checkpoint_every and step % config.checkpoint_every == 0):
                so_far = {**history, "seconds": history["seconds"] + elapsed}
                state = {"fingerprint": fingerprint, "config": config.to_dict(), "history": so_far}
                save_checkpoint(out_dir, step, model, optimizer, scheduler, state, config.keep_checkpoints)
            if interrupted:
                raise TrainingInterrupted(f"training interrupted at step {step} of {total_steps}; checkpoint saved")

    seconds = history["seconds"] + (time.monotonic() - session_start)
    losses = history["train_loss"]
    last_epoch = losses[-steps_per_epoch:]
    metrics = {
        "train_loss": losses,  # one value per optimizer step
        "final_train_loss": sum(last_epoch) / len(last_epoch),  # mean over the last epoch's steps
        "dev_loss": history["dev_loss"],
        "steps": step,
        "epochs": config.epochs,
        "examples": len(train_examples),
        "skipped_examples": len(encoded) - len(train_examples),
        "truncated_examples": sum(e["truncated"] for e in train_examples),
        "tokens": history["tokens"],  # non-padding tokens, prompt and answer
        "answer_tokens": history["answer_tokens"],
        "tokens_per_s": history["tokens"] / seconds if seconds else 0.0,
        "answer_tokens_per_s": history["answer_tokens"] / seconds if seconds else 0.0,
        "seconds": seconds,
        "wall_seconds": time.monotonic() - started,
        "trainable_params": sum(p.numel() for p in trainable),
        "bf16": bf16,
        "base_dtype": str(base_weights_dtype(config, device)).removeprefix("torch."),
        "answer_only_head": parts is not None,
        "device": str(device),
        "resumed_from_step": resumed_from,
    }
    save_adapter(model, config, metrics, out_dir)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer, metrics


def save_adapter(model, config, metrics, out_dir):
    """Write out_dir/adapter so that it exists only when complete: build aside, then rename."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir))
    with removed_on_error(tmp):
        model.save_pretrained(tmp)
        write_json(tmp / "finetune_config.json", config.to_dict())
        write_json(out_dir / "finetune_config.json", config.to_dict())
        write_json(out_dir / "metrics.json", metrics)
    final = out_dir / "adapter"
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=".adapter-old-", dir=out_dir))
        os.replace(final, old / "adapter")
        shutil.rmtree(old)
    os.replace(tmp, final)
    return final


# ---------------------------------------------------------------------------------------------
# generation


def generate_answer(model, tokenizer, instruction, input="", *, max_new_tokens=128, system=""):
    """Greedy answer to one question, rendered exactly as in training, stopped at end of turn."""
    import torch

    prompt = render_conversation([Turn("user", question_text(instruction, input))], system=system)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,  # training turns it off in the model config
        )
    model.train(was_training)
    new_tokens = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
