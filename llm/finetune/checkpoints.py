"""What a run writes to disk: resumable checkpoints while training, the adapter at the end.

Every file and folder is written aside and renamed into place, so a reader (a resume, the
engine) never sees half of one; a checkpoint carries the config and data fingerprint it was
made with, and is resumed only by a run that matches them.
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from llm.finetune.config import CONFIG_FILE
from llm.prompting import PromptFormat


def data_fingerprint(config, records):
    """What a checkpoint must match to be resumed: the data and every setting but bookkeeping."""
    bookkeeping = ("checkpoint_every", "checkpoint_seconds", "keep_checkpoints", "device")
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
            if name.startswith("step-") and name[5:].isdecimal() and (path / "trainer_state.pt").is_file():
                found.append((int(name[5:]), path))
    return sorted(found)


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step, model, optimizer, scheduler, state, keep):
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
    # weights_only: a checkpoint holds tensors, numbers and lists; refuse anything executable.
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True)


def restore_checkpoint(path, state, model, optimizer, scheduler):
    """Put the adapter weights, optimizer, schedule and RNG of a checkpoint back in place."""
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


def save_adapter(model, config, metrics, out_dir, *, prompt_format=PromptFormat.GEMMA, grounding=None):
    """Write out_dir/adapter so that it exists only when complete: build aside, then rename.

    The adapter folder carries its config and the prompt format it was trained on, which the
    engine must serve it with (llm.prompting.read_prompt_format), and for a RAFT-trained adapter
    how it reads references (grounding: {"grounding": format, "k": k}, llm.finetune.raft.read_grounding).
    """
    out_dir = Path(out_dir)
    record = {**config.to_dict(), "prompt_format": PromptFormat(prompt_format).value, **(grounding or {})}
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir))
    with removed_on_error(tmp):
        model.save_pretrained(tmp)
        write_json(tmp / CONFIG_FILE, record)
        write_json(out_dir / CONFIG_FILE, record)
        write_json(out_dir / "metrics.json", metrics)
    final = out_dir / "adapter"
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=".adapter-old-", dir=out_dir))
        os.replace(final, old / "adapter")
        shutil.rmtree(old)
    os.replace(tmp, final)
    return final
