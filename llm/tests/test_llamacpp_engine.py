"""The llama.cpp backend's own behaviour, its parity with transformers, and how a backend is chosen.

The contract both backends share (streaming, batching, admission, cancellation, timeouts, limits,
hot swap, pinning) is tested on both in test_engine.py. Here: what only llama.cpp has (the GGUF
vocabulary check, GGUF LoRA files, a context per version), greedy parity with the transformers
engine on the tiny model with a memorising adapter, and how a backend is chosen. How the Django
side follows CSP_INFERENCE_BACKEND is in chat/tests/test_serving.py.
"""

import json
import logging
import re
import shutil
import sys
import threading

import pytest
import torch

from llm.engine import (
    BackendUnavailable,
    Engine,
    EngineConfig,
    EngineError,
    LlamaCppEngine,
    choose_backend,
    make_engine,
)
from llm.tests.test_engine import _answer, _question, _slow, _wait_for
from llm.basemodel import BaseModelError
from llm.tinymodel import build_tiny_model

NUMBER = re.compile(r"\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def trained():
    """Twelve questions spread over data/train.json: the parity set."""
    with open("data/train.json", encoding="utf-8") as f:
        return json.load(f)[5::9][:12]


@pytest.fixture(scope="module")
def adapter(adapter_cache, tiny_model, trained):
    """An adapter that memorises the twelve answers, with its adapter.gguf (shared: copy it to change it)."""
    return adapter_cache.memorised(tiny_model, trained)


@pytest.fixture
def llama(tiny_model, engines):
    def make(**overrides):
        engine = LlamaCppEngine(EngineConfig(**{"base_dir": tiny_model, "threads": 1, **overrides}))
        engines.append(engine)
        return engine

    return make


def _without_gguf(tiny_model, tmp_path):
    """A copy of the tiny checkpoint without its GGUF."""
    return shutil.copytree(tiny_model, tmp_path / "no-gguf", ignore=shutil.ignore_patterns("gguf"))


def test_the_engine_reports_its_backend_device_and_the_ggufs_quantisation(llama):
    engine = llama()
    assert engine.metrics()["backend"] == "llamacpp" and not engine.loaded
    engine.load()
    metrics = engine.metrics()
    assert (metrics["device"], metrics["dtype"], metrics["threads"]) == ("cpu", "F32", 1)
    assert "model.gguf" in metrics["dtype_reason"]
    assert metrics["contexts"] == [None]  # the base model's context, for adapter None


def test_a_checkpoint_without_a_gguf_is_refused_on_first_use(llama, tiny_model, tmp_path):
    engine = llama(base_dir=_without_gguf(tiny_model, tmp_path))
    with pytest.raises(BaseModelError, match="no GGUF"):
        engine.generate("你好")


def test_a_gguf_with_another_vocabulary_is_refused_at_load(llama, tiny_model, tmp_path):
    # Same architecture and sizes, but a tokenizer trained on other text: the ids mean other things.
    other = build_tiny_model(["completely different words", "another vocabulary 12345"], tmp_path / "other", gguf=True)
    mixed = _without_gguf(tiny_model, tmp_path)
    shutil.copytree(other / "gguf", mixed / "gguf")
    engine = llama(base_dir=mixed)
    with pytest.raises(EngineError, match="does not tokenise like the checkpoint"):
        engine.load()
    assert not engine.loaded


def test_an_adapter_without_its_gguf_is_refused_naming_the_export_command(llama, adapter, tmp_path):
    unconverted = shutil.copytree(adapter, tmp_path / "adapter", ignore=shutil.ignore_patterns("adapter.gguf"))
    engine = llama()
    with pytest.raises(FileNotFoundError, match=r"adapter\.gguf.*manage\.py export_gguf_adapters"):
        engine.set_adapter("v9", unconverted)
    with pytest.raises(FileNotFoundError, match="export_gguf_adapters"):
        engine.submit("你好", adapter="v9", adapter_path=unconverted)
    assert engine.current_adapter is None and engine.loaded_adapters == []


def test_each_version_in_use_has_a_context_and_unused_ones_are_freed(llama, adapter, trained):
    # One adapter file under two version names: what matters here is which contexts exist.
    engine = llama()
    engine.set_adapter("v1", adapter)
    engine.generate(_question(trained[0]), max_new_tokens=2)
    assert _wait_for(lambda: engine.metrics()["contexts"] == ["v1"])  # the base model's context went
    started = threading.Event()
    old = engine.submit(_question(trained[1]), on_event=_slow(0.01, started))
    assert started.wait(5)
    engine.set_adapter("v2", adapter)
    assert engine.metrics()["contexts"] == ["v1", "v2"]  # v1's chat finishes in v1's context
    assert old.result(20)[0] == _answer(trained[1])
    assert _wait_for(lambda: engine.metrics()["contexts"] == ["v2"])
    engine.set_adapter(None)
    engine.generate(_question(trained[0]), max_new_tokens=2)
    assert _wait_for(lambda: engine.metrics()["contexts"] == [None] and engine.loaded_adapters == [])


def test_greedy_answers_agree_with_the_transformers_engine_on_the_trained_questions(llama, engines, tiny_model, adapter, trained):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = Engine(EngineConfig(base_dir=tiny_model, dtype="float32"))
        engines.append(reference)
        served = llama()
        answers = {}
        for engine in (reference, served):
            engine.set_adapter("p", adapter)
            answers[engine.backend] = [engine.generate(_question(r))[0] for r in trained]
    finally:
        torch.set_num_threads(threads)
    pairs = list(zip(answers["transformers"], answers["llamacpp"]))
    same_text = sum(a == b for a, b in pairs)
    same_facts = sum(NUMBER.findall(a) == NUMBER.findall(b) for a, b in pairs)
    tokenizer = served.tokenizer
    agreeing = total = 0
    for a, b in pairs:
        ids_a, ids_b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (a, b))
        agreeing += sum(x == y for x, y in zip(ids_a, ids_b))
        total += max(len(ids_a), len(ids_b))
    print(f"parity: {same_text}/{len(pairs)} identical answers, {same_facts}/{len(pairs)} with the same numbers, "
          f"{agreeing}/{total} tokens agree")
    assert answers["transformers"] == [_answer(r) for r in trained]  # the adapter memorised them
    # Measured on the tiny model (f32 weights, f32 LoRA): every answer identical, token for token.
    assert same_facts >= 0.95 * len(pairs)
    assert same_text == len(pairs) and agreeing == total


# ---------------------------------------------------------------------------------------------
# choosing the backend


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_picks_llamacpp_on_a_cpu_host_when_the_base_model_has_a_gguf(tiny_model, cpu_only):
    backend, reason = choose_backend("auto", EngineConfig(base_dir=tiny_model))
    assert backend == "llamacpp" and "model.gguf" in reason
    engine = make_engine(EngineConfig(base_dir=tiny_model))
    assert isinstance(engine, LlamaCppEngine) and engine.backend_reason == reason and not engine.loaded


def test_auto_picks_transformers_without_a_gguf_on_a_gpu_or_for_a_configured_dtype(tiny_model, tmp_path, cpu_only, monkeypatch):
    backend, reason = choose_backend("auto", EngineConfig(base_dir=_without_gguf(tiny_model, tmp_path)))
    assert backend == "transformers" and "no GGUF" in reason
    backend, reason = choose_backend("auto", EngineConfig(base_dir=tiny_model, dtype="float32"))
    assert backend == "transformers" and "float32" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend, reason = choose_backend("auto", EngineConfig(base_dir=tiny_model))
    assert backend == "transformers" and "GPU" in reason
    assert choose_backend("transformers", EngineConfig(base_dir=tiny_model))[0] == "transformers"
    assert isinstance(make_engine(EngineConfig(base_dir=tiny_model), "transformers"), Engine)


def test_an_explicit_llamacpp_without_a_gguf_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(BackendUnavailable, match="no GGUF file"):
        make_engine(EngineConfig(base_dir=_without_gguf(tiny_model, tmp_path)), "llamacpp")


def test_without_llama_cpp_auto_falls_back_to_transformers_with_one_log_line(tiny_model, cpu_only, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with caplog.at_level(logging.INFO, logger="llm.engine"):
        engine = make_engine(EngineConfig(base_dir=tiny_model))
    assert isinstance(engine, Engine) and "llama-cpp-python cannot be imported" in engine.backend_reason
    assert [(r.levelname, "llama-cpp-python cannot be imported" in r.getMessage()) for r in caplog.records] == [("WARNING", True)]
    with pytest.raises(BackendUnavailable, match="llama-cpp-python cannot be imported"):
        make_engine(EngineConfig(base_dir=tiny_model), "llamacpp")


def test_extra_weight_buffers_are_off_by_default_on_cpus_that_advertise_amx(tmp_path):
    from llm.engine.llamacpp import cpu_flags, use_extra_buffers

    # Measured on a Xeon VM that advertises amx_int8 and grants the tile permission: the first
    # AMX matmul of Gemma's Q4_K_M weights killed the process (SIGILL).
    assert use_extra_buffers("auto", {"avx2", "avx512f", "amx_int8", "amx_tile"}) is False
    assert use_extra_buffers("auto", {"avx2", "avx512f", "avx512_bf16"}) is True
    assert use_extra_buffers("on", {"amx_int8"}) is True and use_extra_buffers("off", {"avx2"}) is False
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_tile"} and cpu_flags(tmp_path / "none") == set()
    with pytest.raises(ValueError, match="extra_buffers"):
        EngineConfig(extra_buffers="amx")
