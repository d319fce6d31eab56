"""`train()`: fine-tune a LoRA adapter on Q&A records, read top to bottom.

Set up (seed, model + LoRA, examples, optimizer), resume from the last checkpoint, then the
loop: micro-batches accumulate into optimizer steps, each step reports progress, may be
checkpointed, cancelled or interrupted; at the end the adapter, its config and the metrics are
written (see llm/finetune/__init__.py for what ends up where).
"""

import math
import random
import shutil
import time
from pathlib import Path

import torch

from llm.finetune.checkpoints import (
    data_fingerprint,
    list_checkpoints,
    read_checkpoint_state,
    remove_leftovers,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
)
from llm.finetune.data import IGNORE_INDEX, collate, encode_example, length_grouped_batches
from llm.finetune.kernels import use_fast_lora_dropout
from llm.finetune.loss import answer_loss, checked_answer_head, dev_loss
from llm.modeling import add_lora, base_weights_dtype, load_base, lora_input_casts_off, resolve_device, use_bf16
from llm.prompting import prompt_format_for


class TrainingCancelled(Exception):
    """Raised by `train` when `should_stop()` returned true; checkpoints stay, no adapter is written."""


class TrainingInterrupted(Exception):
    """Raised by `train` when `should_interrupt()` returned true, after a checkpoint of the step
    reached: resuming loses nothing but the micro-batches of the step that was under way."""


def linear_schedule(optimizer, warmup_steps, total_steps):
    """Linear warmup to the base learning rate, then linear decay to zero."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    config, base_dir, train_records, dev_records, out_dir, *, on_progress=None, should_stop=None, should_interrupt=None,
    resume=True, grounding=None,
):
    """Fine-tune a LoRA adapter on base_dir with train_records; write it to out_dir/adapter.

    on_progress(dict) is called after every optimizer step with step, total_steps, epoch, loss,
    lr, elapsed_s, eta_s, and dev_loss at the end of each epoch. should_stop() is checked before
    every forward pass; when it returns true, TrainingCancelled is raised (checkpoints are kept,
    no adapter is written). should_interrupt() is checked after every optimizer step; when it
    returns true, a checkpoint of that step is saved (whatever the checkpoint settings say) and
    TrainingInterrupted is raised. Otherwise a checkpoint is saved every config.checkpoint_every
    steps, once config.checkpoint_seconds of training passed since the last one, and at each
    epoch's end (with either set). With resume, training continues from the last complete
    checkpoint in out_dir/checkpoints. grounding, for records built by llm.finetune.raft, is
    what the adapter records of how it reads references (raft.grounding_record()): the engine
    then serves it grounded prompts. Returns the metrics dict that is also saved as metrics.json.
    """
    _, _, metrics = train_model(
        config, base_dir, train_records, dev_records, out_dir,
        on_progress=on_progress, should_stop=should_stop, should_interrupt=should_interrupt, resume=resume,
        grounding=grounding,
    )
    return metrics


def train_model(
    config, base_dir, train_records, dev_records, out_dir, *, on_progress=None, should_stop=None, should_interrupt=None,
    resume=True, grounding=None,
):
    """`train`, returning (model, tokenizer, metrics): evaluate in the same process without reloading.

    The model comes back with its base weights in the training dtype (bf16 where bf16 is used,
    as the chat engine serves them on such hardware).
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_records = [dict(r) for r in train_records]
    dev_records = [dict(r) for r in dev_records or []]
    fingerprint = data_fingerprint(config, train_records)
    if not resume:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    remove_leftovers(out_dir)

    # the model: frozen base + fresh LoRA (seeded: LoRA A matrices and dropout masks)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = resolve_device(config)
    bf16 = use_bf16(config, device)
    model, tokenizer = load_base(base_dir, config, dtype=base_weights_dtype(config, device))
    model = add_lora(model, config)
    if device.type == "cpu":
        use_fast_lora_dropout(model)
    model.config.use_cache = False  # the cache only costs memory while training

    # the data, rendered as the engine will serve this checkpoint (recorded with the adapter)
    prompt_format = prompt_format_for(tokenizer)
    encoded = [encode_example(tokenizer, r, config, prompt_format) for r in train_records]
    train_examples = [e for e in encoded if e is not None]
    if not train_examples:
        raise ValueError("no training example has an answer token left (empty data, or max_length too small)")
    dev_examples = [e for e in (encode_example(tokenizer, r, config, prompt_format) for r in dev_records) if e is not None]
    lengths = [len(e["input_ids"]) for e in train_examples]
    pad_id = tokenizer.pad_token_id

    # the schedule
    micro_batches_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(total_steps * config.warmup_ratio)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)

    # resume from the last complete checkpoint, if it was made from the same data and settings
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

    # the loop
    model.train()
    shortest = train_examples[lengths.index(min(lengths))]
    parts = checked_answer_head(model, shortest, pad_id, device, bf16)  # None: full logits everywhere
    session_start, session_first_step = time.monotonic(), step
    last_checkpoint = session_start
    checkpointing = bool(config.checkpoint_every or config.checkpoint_seconds)
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
            # By steps alone a run shorter than checkpoint_every steps (a 1-epoch run on the sample
            # data has 33) never had one to resume from; time and epoch ends bound the loss whatever
            # the run's length.
            due = checkpointing and (
                (config.checkpoint_every and step % config.checkpoint_every == 0)
                or (config.checkpoint_seconds and time.monotonic() - last_checkpoint >= config.checkpoint_seconds)
                or step % steps_per_epoch == 0
            )
            if interrupted or due:
                so_far = {**history, "seconds": history["seconds"] + elapsed}
                state = {"fingerprint": fingerprint, "config": config.to_dict(), "history": so_far}
                save_checkpoint(out_dir, step, model, optimizer, scheduler, state, config.keep_checkpoints)
                last_checkpoint = time.monotonic()
            if interrupted:
                raise TrainingInterrupted(f"training interrupted at step {step} of {total_steps}; checkpoint saved")

    # the adapter, its config and the metrics
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
        "prompt_format": prompt_format.value,
        **(grounding or {}),
    }
    save_adapter(model, config, metrics, out_dir, prompt_format=prompt_format, grounding=grounding)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer, metrics
