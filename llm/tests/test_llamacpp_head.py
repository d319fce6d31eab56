"""The llama.cpp engine on a copy of the GGUF with its output layer requantised (EngineConfig.head_type).

The tiny model's GGUF is f32 with a tied embedding of rows of 128 values: whole q4_0 blocks (32),
not whole q4_k blocks (256). Each test works on its own copy of the checkpoint, so the shared
tiny model's folder never gains a requantised file.
"""

import os
import shutil

import numpy
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from llm.engine import EngineConfig, EngineError, LlamaCppEngine
from llm.engine.llamacpp import gguf_with_head
from llm.tests.test_engine import _question


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    """A copy of the tiny checkpoint (its GGUF in gguf/model.gguf)."""
    return shutil.copytree(tiny_model, tmp_path / "tiny")


def _tensors(path):
    return {tensor.name: tensor for tensor in GGUFReader(path).tensors}


def test_the_copy_requantises_only_the_output_layer_and_is_made_once(checkpoint):
    original = checkpoint / "gguf" / "model.gguf"
    copy = gguf_with_head(original, "q4_0")
    assert copy == checkpoint / "gguf" / "model.head-q4_0.gguf"
    before, after = _tensors(original), _tensors(copy)
    assert after["token_embd.weight"].tensor_type == GGMLQuantizationType.Q4_0
    assert before.keys() == after.keys()
    for name in before.keys() - {"token_embd.weight"}:
        assert before[name].tensor_type == after[name].tensor_type, name
        assert before[name].data.tobytes() == after[name].data.tobytes(), name
    made = copy.stat().st_mtime_ns
    assert gguf_with_head(original, "q4_0") == copy and copy.stat().st_mtime_ns == made
    assert sorted(p.name for p in original.parent.iterdir()) == ["model.gguf", "model.head-q4_0.gguf"]
    stale = original.stat().st_mtime_ns - 10**9
    os.utime(copy, ns=(stale, stale))  # older than the base GGUF (replaced since): the copy is made again
    assert gguf_with_head(original, "q4_0") == copy and copy.stat().st_mtime_ns > stale


def test_an_engine_with_a_head_type_loads_the_copy_and_answers(checkpoint, engines, records):
    engine = LlamaCppEngine(EngineConfig(base_dir=checkpoint, threads=1, head_type="q4_0"))
    engines.append(engine)
    text, stats = engine.generate(_question(records[0]), max_new_tokens=8)
    assert stats.finish_reason in ("stop", "length") and stats.tokens >= 1 and stats.error is None
    assert engine.gguf_path == checkpoint / "gguf" / "model.head-q4_0.gguf"
    assert "model.head-q4_0.gguf with a q4_0 output layer" in engine.metrics()["dtype_reason"]


def test_the_engine_still_finds_the_original_gguf_beside_a_copy(checkpoint, engines):
    gguf_with_head(checkpoint / "gguf" / "model.gguf", "q4_0")
    engine = LlamaCppEngine(EngineConfig(base_dir=checkpoint, threads=1))
    engines.append(engine)
    engine.load()
    assert engine.gguf_path == checkpoint / "gguf" / "model.gguf"


def test_rows_that_do_not_split_into_the_types_blocks_are_refused_before_anything_is_written(checkpoint):
    # llama.cpp itself would abort the whole process on q4_k rows of 128 values.
    with pytest.raises(EngineError, match="rows of 128 values, not whole q4_k blocks of 256"):
        gguf_with_head(checkpoint / "gguf" / "model.gguf", "q4_k")
    assert [p.name for p in (checkpoint / "gguf").iterdir()] == ["model.gguf"]


def test_a_file_that_is_not_a_gguf_raises_and_leaves_no_file_behind(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(EngineError, match="not a GGUF"):
        gguf_with_head(fake, "q4_0")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_a_quantisation_llama_cpp_refuses_raises_and_leaves_no_temporary_file(tmp_path):
    # A well-formed GGUF of an architecture llama.cpp does not know: it reads, llama.cpp fails.
    unknown = tmp_path / "model.gguf"
    writer = GGUFWriter(unknown, "no-such-architecture")
    writer.add_file_type(0)  # all f32
    writer.add_tensor("token_embd.weight", numpy.zeros((4, 32), dtype=numpy.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EngineError, match="llama.cpp could not requantise the output layer of .* to q4_0"):
        gguf_with_head(unknown, "q4_0")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_the_config_refuses_an_unknown_head_type():
    with pytest.raises(ValueError, match=r"head_type must be empty .* or one of \('q4_0', .*'q8_0'\), not 'q4_k'"):
        EngineConfig(head_type="q4_k")
    assert EngineConfig().head_type == ""
