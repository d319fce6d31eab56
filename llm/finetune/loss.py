"""The training loss: cross-entropy on the answer tokens only, with the LM head run only there."""

import contextlib
import math

import torch

from llm.finetune.data import IGNORE_INDEX, collate
from llm.finetune.kernels import head_cross_entropy
from llm.modeling import lora_input_casts_off


@contextlib.contextmanager
def dropout_off(model):
    """Switch dropout off for a loss-only forward, leaving every other module in its mode.

    model.eval() would do it too, but bitsandbytes repacks 4-bit weights for CPU inference on an
    eval-mode forward (with AVX-512 bf16), after which those layers cannot train any more.
    """
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


def answer_loss(model, batch, parts=None, *, reduction="mean"):
    """Cross-entropy of a collated batch on its labelled (answer) tokens only.

    The logits at position t predict the token at t + 1. With `parts` (see answer_head_parts),
    the LM head runs only at the positions whose next token is labelled: the loss reads nothing
    else, so it is exact, and for a 262k vocabulary the head is most of the model's FLOPs and
    its logits most of the memory traffic. Without parts, the model's own forward gives logits
    everywhere and the same rows are picked afterwards.
    """
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
