"""The settings of one fine-tuning run, as one flat dataclass with commented defaults.

Torch-free on purpose: the Django side (training/services.py) builds a FinetuneConfig in every
process, and only training workers need torch. A test keeps it that way.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# Saved beside out_dir/adapter and inside it: the config a run trained with, plus what it chose
# at run time (the prompt format). Checkpoints carry the same dict.
CONFIG_FILE = "finetune_config.json"


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
    # checkpoints: every N optimizer steps (0 = not by steps) and after every `checkpoint_seconds`
    # of training (0 = not by time); with either set, also at each epoch's end. A run killed
    # then loses at most that interval, however few steps it has. The last `keep_checkpoints` are kept.
    checkpoint_every: int = 0
    checkpoint_seconds: float = 0.0
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
        for name in ("checkpoint_every", "checkpoint_seconds", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Build from a saved dict, ignoring keys this version does not know."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def read_saved_record(adapter_dir):
    """The dict saved as CONFIG_FILE in an adapter folder, or {} where there is none."""
    path = Path(adapter_dir) / CONFIG_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
