import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.prompting import END, START
from llm.tinymodel import build_tiny_model, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "用户问：买的东西不想要了，可以退货吗？",
    "您好！星河商城支持7天无理由退货，自签收次日起7天内均可申请。",
    "用户问：退款多久能到账？",
    "您好！退款将在1-3个工作日内原路退回到您的原支付账户。",
] * 5


def test_tiny_model_builds_in_a_few_seconds_and_loads_from_local_files(tmp_path):
    started = time.monotonic()
    out = build_tiny_model(TEXTS, tmp_path / "tiny")
    assert time.monotonic() - started < 10
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert (out / "model.safetensors").is_file()
    assert tokenizer.eos_token == END and tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<bos>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_turn_markers_are_single_tokens(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(TEXTS, tmp_path / "tiny"), local_files_only=True)
    ids = tokenizer(f"{START}user\n如何退货？{END}\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(START)
    assert tokenizer.convert_tokens_to_ids(END) in ids
    for marker in (START, END, "<pad>", "<bos>", "<eos>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    # Chinese text survives the byte-level round trip.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n如何退货？\n"


def test_reloaded_tokenizer_encodes_exactly_like_the_built_one(tmp_path):
    # AutoTokenizer loads a qwen2 checkpoint as Qwen2Tokenizer, which rebuilds the pipeline.
    built = build_tokenizer(TEXTS)
    out = build_tiny_model(TEXTS, tmp_path / "tiny")
    loaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in [*TEXTS[:4], "满99元包邮，ＡＢＣ１２３", f"{START}model\n好的{END}\n", "<|endoftext|>"]:
        assert loaded(text)["input_ids"] == built(text)["input_ids"], text
    assert len(loaded) == len(built) == AutoModelForCausalLM.from_pretrained(out).config.vocab_size


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    first = build_tiny_model(TEXTS, tmp_path / "a", seed=3)
    again = build_tiny_model(TEXTS, tmp_path / "b", seed=3)
    other = build_tiny_model(TEXTS, tmp_path / "c", seed=4)
    weights_first, weights_again, weights_other = (load_file(d / "model.safetensors") for d in (first, again, other))
    assert weights_first.keys() == weights_again.keys()
    assert all(torch.equal(weights_first[k], weights_again[k]) for k in weights_first)
    assert not torch.equal(weights_first["model.embed_tokens.weight"], weights_other["model.embed_tokens.weight"])
    assert (first / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_building_does_not_reseed_the_callers_random_generator(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(TEXTS, tmp_path / "tiny", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_needs_some_text(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_model(["", ""], tmp_path / "tiny")
