"""GGUF files for llama.cpp: LoRA adapters, and whole small checkpoints. A plain module, no Django.

llama.cpp's own converters (`convert_lora_to_gguf.py`, `convert_hf_to_gguf.py`) are scripts in its
source tree, not in any wheel; this module writes the same formats with the `gguf` package:

    from llm.gguf import write_lora_gguf, write_model_gguf
    write_lora_gguf("var/adapters/v3", base_dir="var/models/gemma-3-270m")   # -> var/adapters/v3/adapter.gguf
    write_model_gguf("var/models/tiny")                                      # -> var/models/tiny/gguf/model.gguf

A LoRA GGUF holds `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, the base
model's `general.architecture`, and two tensors per adapted linear layer, `blk.N.<module>.weight.lora_a`
(PEFT's lora_A, rank × in) and `.lora_b` (lora_B, out × rank). llama.cpp scales the product by
alpha / rank (rank read from the tensors) times the scale it is loaded with, so at scale 1.0 it
applies exactly PEFT's update; where PEFT's scale is not alpha / rank (rsLoRA, per-module
`alpha_pattern`), the difference is folded into lora_b. What llama.cpp cannot apply is refused
with a ValueError that names it: DoRA, LoRA biases, `modules_to_save`, trainable tokens,
embedding or LM-head LoRA, an architecture it does not know.

`write_model_gguf` converts only the tiny Qwen2 (or Llama) test checkpoints of
`llm.tinymodel` (byte-level BPE tokenizer with Qwen2's split regex), so that tests can run the
llama.cpp backend without the 270M model. Real base models come as GGUF already (the embedded
Gemma ships as one; `llm.basemodel` keeps it beside the safetensors).

Every file is written aside and renamed into place: a GGUF that exists is a whole one.
"""

import json
import math
import os
import re
import secrets
from pathlib import Path

import numpy as np

LORA_FILENAME = "adapter.gguf"
MODEL_FILENAME = "model.gguf"

# Hugging Face model_type -> llama.cpp architecture name, for the architectures whose adapters
# this module converts (and that llama.cpp serves with LoRA).
ARCHITECTURES = {"gemma3_text": "gemma3", "qwen2": "qwen2", "llama": "llama"}
# Whole-checkpoint conversion: only what llm.tinymodel builds.
MODEL_ARCHITECTURES = {"qwen2": "qwen2", "llama": "llama"}
DTYPES = ("f32", "f16")

# Qwen2's pre-tokenizer split regex, as Qwen2Tokenizer and llm.tinymodel write it into
# tokenizer.json; llama.cpp knows it as the "qwen2" pre-tokenizer.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def write_lora_gguf(adapter_dir, out_path=None, *, base_dir=None, dtype="f32"):
    """Convert the PEFT LoRA adapter in adapter_dir to a llama.cpp GGUF LoRA; returns its path.

    The base model's architecture and layer count come from `base_dir`'s config.json when given,
    else from the adapter's `base_model_name_or_path` when that is a local directory (it may have
    moved since training: pass base_dir then). dtype is "f32" (the trained values exactly, as
    llama.cpp's converter writes by default) or "f16" (half the size, but measured on Gemma-270M
    its greedy answers parted from transformers + peft after 3 tokens where f32 kept all 60). The
    default out_path is
    `<adapter_dir>/adapter.gguf`. Raises ValueError naming what cannot be converted, and
    FileNotFoundError for a missing adapter or base config.
    """
    import gguf

    adapter_dir = Path(adapter_dir)
    out_path = Path(out_path) if out_path is not None else adapter_dir / LORA_FILENAME
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    config = _read_json(adapter_dir / "adapter_config.json", "adapter config")
    _refuse_unsupported_lora(config, adapter_dir)
    base_config = _base_config(config, base_dir, adapter_dir)
    model_type = base_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"cannot convert an adapter of a {model_type!r} base model to GGUF: supported architectures "
            f"are {', '.join(sorted(ARCHITECTURES))}"
        )
    arch_name = ARCHITECTURES[model_type]
    arch = _model_arch(arch_name)
    n_layers = int(base_config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch, n_layers)

    pairs = _lora_pairs(_load_safetensors(adapter_dir / "adapter_model.safetensors"), adapter_dir)
    if not pairs:
        raise ValueError(f"adapter {str(adapter_dir)!r} holds no LoRA tensors")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    # llama.cpp multiplies by adapter.lora.alpha / rank; rsLoRA's alpha / sqrt(rank) is that with
    # alpha * sqrt(rank) (exact for a uniform rank, folded into lora_b below otherwise).
    gguf_alpha = alpha * math.sqrt(rank) if config.get("use_rslora") else alpha

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha)
    writer.add_name(adapter_dir.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for module, (lora_a, lora_b) in sorted(pairs.items(), key=lambda item: _natural_key(item[0])):
        hf_name = f"{module}.weight"
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None or not gguf_name.startswith("blk."):
            raise ValueError(
                f"LoRA on {module!r} cannot be converted: llama.cpp applies adapters to the linear layers "
                f"of the {arch_name} blocks only (not to embeddings or the LM head)"
            )
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"LoRA tensors of {module!r} have shapes {lora_a.shape} and {lora_b.shape}, not (r, in) and (out, r)")
        module_rank = lora_a.shape[0]
        scale = _peft_scale(config, module, module_rank)
        factor = scale / (gguf_alpha / module_rank)
        if not math.isclose(factor, 1.0, rel_tol=1e-6):
            lora_b = lora_b * factor
        if arch_name == "llama":
            lora_b = _llama_permute_rows(lora_b, module, base_config)
        np_dtype = np.float32 if dtype == "f32" else np.float16
        writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(lora_a, dtype=np_dtype))
        writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(lora_b, dtype=np_dtype))
    return _write_atomically(writer, out_path)


def _refuse_unsupported_lora(config, adapter_dir):
    where = f"adapter {str(adapter_dir)!r}"
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where} is a {config.get('peft_type')} adapter; only LoRA converts to GGUF")
    refusals = [
        ("use_dora", "DoRA (use_dora) is not supported by llama.cpp"),
        ("lora_bias", "LoRA biases (lora_bias) are not supported by llama.cpp"),
        ("modules_to_save", "modules_to_save (fully trained extra modules) cannot be expressed as a GGUF LoRA"),
        ("trainable_token_indices", "trainable tokens (trainable_token_indices) cannot be expressed as a GGUF LoRA"),
        ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) is not converted"),
        ("target_parameters", "LoRA on parameters (target_parameters) is not converted"),
        ("layer_replication", "layer_replication is not supported by llama.cpp"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers) is not converted"),
    ]
    for key, reason in refusals:
        if config.get(key):
            raise ValueError(f"{where}: {reason}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: trained biases (bias={config['bias']!r}) are not supported by llama.cpp")


def _base_config(adapter_config, base_dir, adapter_dir):
    if base_dir is not None:
        return _read_json(Path(base_dir) / "config.json", "base model config")
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded and (Path(recorded) / "config.json").is_file():
        return _read_json(Path(recorded) / "config.json", "base model config")
    raise FileNotFoundError(
        f"the base model of adapter {str(adapter_dir)!r} is not found (base_model_name_or_path is "
        f"{recorded!r}); pass base_dir, the base checkpoint directory"
    )


def _lora_pairs(tensors, adapter_dir):
    """{module path without prefix: (lora_A, lora_B)} as float32 numpy arrays."""
    pairs = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(
            r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?",
            name,
        )
        if match is None:
            if "lora_magnitude_vector" in name:
                raise ValueError(f"adapter {str(adapter_dir)!r} has DoRA magnitudes ({name}); DoRA is not supported by llama.cpp")
            raise ValueError(
                f"adapter {str(adapter_dir)!r} holds {name!r}, which is not a LoRA A/B matrix "
                "(fully trained modules or embeddings cannot be expressed as a GGUF LoRA)"
            )
        module, kind = match["module"], match["kind"]
        if kind.startswith("lora_embedding"):
            raise ValueError(f"LoRA on the embedding {module!r} is not converted: llama.cpp adapters here cover linear layers only")
        # "model.language_model." is how multimodal checkpoints nest the text model
        module = module.replace("model.language_model.", "model.", 1)
        entry = pairs.setdefault(module, [None, None])
        entry[0 if kind == "lora_A" else 1] = tensor
    for module, (lora_a, lora_b) in pairs.items():
        if lora_a is None or lora_b is None:
            raise ValueError(f"adapter {str(adapter_dir)!r} has only one of lora_A / lora_B for {module!r}")
    return {module: (a, b) for module, (a, b) in pairs.items()}


def _peft_scale(config, module, rank):
    """The factor PEFT multiplies this module's B @ A by (peft.tuners.lora.layer.LoraLayer)."""
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        # peft.utils.other.get_pattern_key: a pattern matches a whole trailing part of the name
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _llama_permute_rows(lora_b, module, base_config):
    """llama.cpp's llama graph wants q/k rows reordered as convert_hf_to_gguf's LlamaModel.permute does.

    The permutation acts on the output rows of W = B @ A, that is on the rows of B.
    """
    n_head = int(base_config["num_attention_heads"])
    if module.endswith("self_attn.q_proj"):
        heads = n_head
    elif module.endswith("self_attn.k_proj"):
        heads = int(base_config.get("num_key_value_heads") or n_head)
    else:
        return lora_b
    return _permute_heads(lora_b, heads)


def _permute_heads(weights, heads):
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# ---------------------------------------------------------------------------------------------
# whole small checkpoints (the tiny test model)


def write_model_gguf(hf_dir, out_path=None, *, dtype=None):
    """Convert a small Hugging Face checkpoint (qwen2 or llama, f32/f16/bf16 safetensors, byte-level
    BPE tokenizer with Qwen2's split regex) to a GGUF that llama.cpp loads; returns its path.

    dtype: "f32" or "f16" for the matrices (norms and biases stay f32); default f16 for an f16
    checkpoint, f32 otherwise. The default out_path is `<hf_dir>/gguf/model.gguf`, where
    `llm.basemodel.describe_checkpoint` finds it. The tokenizer (tokens, types, merges,
    special ids, whether BOS is prepended) is taken from the checkpoint, so llama.cpp and the
    Hugging Face tokenizer turn the same (NFC) text into the same ids.
    """
    import gguf

    hf_dir = Path(hf_dir)
    out_path = Path(out_path) if out_path is not None else hf_dir / "gguf" / MODEL_FILENAME
    config = _read_json(hf_dir / "config.json", "model config")
    model_type = config.get("model_type")
    if model_type not in MODEL_ARCHITECTURES:
        raise ValueError(
            f"write_model_gguf converts only {', '.join(sorted(MODEL_ARCHITECTURES))} checkpoints, not "
            f"{model_type!r} ({hf_dir}); use llama.cpp's convert_hf_to_gguf.py for real models"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    arch_name = MODEL_ARCHITECTURES[model_type]
    n_layers = int(config["num_hidden_layers"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"write_model_gguf does not convert rope scaling {rope!r} ({hf_dir})")

    tensors = {}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(hf_dir)!r}")
    for path in files:
        tensors.update(_load_safetensors(path))
    if dtype is None:
        dtype = "f16" if _source_dtype(hf_dir) == "F16" else "f32"

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(hf_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch_name == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, hf_dir, int(config["vocab_size"]))

    names = gguf.get_tensor_name_map(_model_arch(arch_name), n_layers)
    tied = config.get("tie_word_embeddings", False)
    for name in sorted(tensors, key=_natural_key):
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for the {arch_name} tensor {name!r} ({hf_dir})")
        data = tensors[name]
        if arch_name == "llama" and name.endswith("self_attn.q_proj.weight"):
            data = _permute_heads(data, n_head)
        elif arch_name == "llama" and name.endswith("self_attn.k_proj.weight"):
            data = _permute_heads(data, n_head_kv)
        np_dtype = np.float16 if dtype == "f16" and data.ndim == 2 else np.float32
        writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np_dtype))
    return _write_atomically(writer, out_path)


def _add_tokenizer(writer, hf_dir, vocab_size):
    """The vocabulary the way convert_hf_to_gguf.py's gpt2 path writes it."""
    import gguf
    from transformers import AutoTokenizer

    spec = _read_json(hf_dir / "tokenizer.json", "tokenizer")
    if spec.get("model", {}).get("type") != "BPE" or not _is_qwen2_byte_level(spec):
        raise ValueError(
            f"write_model_gguf converts byte-level BPE tokenizers with Qwen2's split regex only ({hf_dir / 'tokenizer.json'})"
        )
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer of {hf_dir} has ids beyond the model's vocab_size {vocab_size}")
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges as SpecialVocab reads them (it also handles the list-of-pairs format of tokenizers 0.20+).
    merges = gguf.SpecialVocab(hf_dir, load_merges=True).merges
    if not merges:
        raise ValueError(f"no BPE merges in {hf_dir / 'tokenizer.json'}")
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Whether encoding prepends BOS / appends EOS: asked of the tokenizer itself, not guessed.
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])


def _is_qwen2_byte_level(spec):
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    normalizer = (spec.get("normalizer") or {}).get("type")
    return regexes == [QWEN2_SPLIT_REGEX] and len(byte_level) == 1 and normalizer in (None, "NFC")


def _source_dtype(hf_dir):
    from safetensors import safe_open

    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                return handle.get_slice(name).get_dtype()
    return None


# ---------------------------------------------------------------------------------------------
# shared


def _model_arch(arch_name):
    import gguf

    for arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch_name:
            return arch
    raise ValueError(f"the installed gguf package does not know the architecture {arch_name!r}")


def _load_safetensors(path):
    """{name: float32 numpy array}; through torch so that bf16 files load too."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing")
    return {name: tensor.float().numpy() for name, tensor in load_file(str(path), device="cpu").items()}


def _read_json(path, what):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} is missing") from None
    except ValueError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None


def _natural_key(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _write_atomically(writer, out_path):
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.{secrets.token_hex(4)}.partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out_path
