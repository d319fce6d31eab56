"""Load a local base checkpoint as (model, tokenizer), add LoRA to it, or load a trained adapter.

Training, evaluation and the transformers engine all load through `load_base`, so a checkpoint
that trains also serves. Never downloads: a base model is a local Hugging Face directory.

    from llm.modeling import load_adapter
    model, tokenizer = load_adapter("var/models/gemma-3-270m", "var/runs/demo/adapter")
"""

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.helpers import disable_input_dtype_casting
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from llm.basemodel import BaseModelError
from llm.finetune.config import FinetuneConfig, read_saved_record


def resolve_device(config):
    device = torch.device(config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # device_map wants an index
    return device


def use_bf16(config, device):
    """Whether to autocast to bf16: asked for, or "auto" and the hardware runs it fast."""
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


def add_lora(model, config):
    """Wrap model in trainable LoRA adapters as config says (4-bit bases are prepared for it first)."""
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


def lora_input_casts_off(model, active):
    """Under bf16 autocast, keep peft from casting each LoRA input to fp32 (the LoRA weights' dtype).

    Autocast casts it straight back to bf16 for the LoRA matmuls: two copies of every LoRA
    input, forward and backward, for nothing. Without autocast the cast is needed and stays.
    """
    return disable_input_dtype_casting(model, active=active)


def load_adapter(base_dir, adapter_dir, config=None):
    """Load base + a trained adapter as (model, tokenizer), ready for `llm.generation.generate_answer`.

    Without a config, the one saved with the adapter decides how the base loads.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {str(adapter_dir)!r} (adapter_config.json is missing)")
    if config is None:
        config = FinetuneConfig.from_dict(read_saved_record(adapter_dir))
    model, tokenizer = load_base(base_dir, config)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    model.eval()
    return model, tokenizer
