"""Both engines serve each adapter in the prompt format it was trained on (llm.prompting.PromptFormat).

The checkpoint here is the tiny model with the chat template of test_prompting.py on its tokenizer
(same weights and vocabulary, so its GGUF still serves it): a template that writes its own BOS and
ends turns with <eos>, where the Gemma format ends them with <end_of_turn>. Two adapters on it:
one trained on the template (its record says "chat_template"), and the session's `trained_adapter`
with its record of the format removed, as an adapter trained before formats were recorded: that
one learnt the Gemma format and must be served in it although the checkpoint has a template.
Each answers its memorised questions word for word only when its prompt is rendered as in
training and its answer stops on its own format's end of turn.
"""

import json
import shutil
import threading

import pytest
from transformers import AutoTokenizer

from llm.engine import EngineConfig, EngineError, Turn
from llm.finetune.config import read_saved_record
from llm.prompting import (
    PromptFormat,
    encode_prompt,
    read_prompt_format,
    render_conversation,
    render_training_example,
)
from llm.tests.test_engine import ENGINES, _answer, _question, _slow, _wait_for, engine_factory
from llm.tests.test_prompting import TEMPLATE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "你是星河商城的客服。"


@pytest.fixture(scope="module")
def templated_model(tiny_model, tmp_path_factory):
    """A copy of the tiny checkpoint, GGUF included, whose tokenizer has a chat template."""
    base = shutil.copytree(tiny_model, tmp_path_factory.mktemp("templated") / "model")
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def records():
    with open("data/train.json", encoding="utf-8") as f:
        return json.load(f)[3::11][:4]


@pytest.fixture(scope="module")
def template_adapter(adapter_cache, templated_model, records):
    """Memorised `records` on the templated checkpoint (with a system prompt), with its adapter.gguf."""
    adapter = adapter_cache.memorised(templated_model, records, system_prompt=SYSTEM)
    assert read_prompt_format(adapter) is PromptFormat.CHAT_TEMPLATE
    return adapter


@pytest.fixture(scope="module")
def unrecorded_adapter(trained_adapter, tmp_path_factory):
    """`trained_adapter` (Gemma format, memorised `faq`) as an adapter saved before the format was recorded."""
    adapter = shutil.copytree(trained_adapter, tmp_path_factory.mktemp("unrecorded") / "adapter")
    record = read_saved_record(adapter)
    assert record.pop("prompt_format") == PromptFormat.GEMMA
    (adapter / "finetune_config.json").write_text(json.dumps(record), encoding="utf-8")
    assert read_prompt_format(adapter) is PromptFormat.GEMMA
    return adapter


@pytest.fixture(scope="module")
def eos_adapter(adapter_cache, tiny_model):
    """A Gemma-format adapter (trained on the checkpoint without the template, served on the one with
    it) whose memorised answer has the template's end-of-turn token, <eos>, in the middle."""
    pairs = [{"instruction": "营业时间？", "input": "", "output": "您好！<eos>每天 9:00-21:00 营业。"}] * 4
    adapter = adapter_cache.memorised(tiny_model, pairs)
    assert read_prompt_format(adapter) is PromptFormat.GEMMA
    return adapter


@pytest.fixture(params=sorted(ENGINES))
def backend(request):
    return request.param


@pytest.fixture
def make_engine(templated_model, backend):
    """Engine factory of the backend on the templated checkpoint."""
    yield from engine_factory(backend, templated_model)


def _training_prompt(record, engine, system="", prompt_format=PromptFormat.GEMMA):
    prompt, _ = render_training_example(
        record["instruction"], record["input"], record["output"],
        system=system, prompt_format=prompt_format, tokenizer=engine.tokenizer,
    )
    return prompt


def test_an_adapter_trained_on_a_chat_template_is_served_in_it(make_engine, template_adapter, records):
    engine = make_engine()
    engine.set_adapter("t1", template_adapter)
    engine.load()
    tokenizer = engine.tokenizer
    for record in records:
        prompt = engine.render([Turn("user", _question(record))])
        expected = _training_prompt(record, engine, SYSTEM, PromptFormat.CHAT_TEMPLATE)
        assert prompt.prompt_format is PromptFormat.CHAT_TEMPLATE
        assert prompt.text == expected and prompt.text.startswith(f"<bos><start_of_turn>system: {SYSTEM}<eos>")
        assert prompt.ids == encode_prompt(tokenizer, expected, PromptFormat.CHAT_TEMPLATE)
        assert prompt.ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one

        request = engine.submit([Turn("user", _question(record))])
        text, stats = request.result(30)
        assert text == _answer(record)
        # It stopped on the template's end of turn (<eos>), right after the memorised answer.
        assert stats.finish_reason == "stop"
        assert tokenizer.decode(request.token_ids, skip_special_tokens=False) == _answer(record)


def test_an_adapter_without_a_recorded_format_is_served_in_gemma_format_on_a_checkpoint_with_a_template(
    make_engine, unrecorded_adapter, faq
):
    engine = make_engine()
    engine.set_adapter("old", unrecorded_adapter)
    for record in faq[:3]:
        prompt = engine.render([Turn("user", _question(record))])
        expected = _training_prompt(record, engine)
        assert prompt.prompt_format is PromptFormat.GEMMA
        assert prompt.text == expected and "<eos>" not in prompt.text
        assert prompt.ids == engine.tokenizer(expected, add_special_tokens=True)["input_ids"]
        text, stats = engine.generate([Turn("user", _question(record))])
        assert (text, stats.finish_reason) == (_answer(record), "stop")


def test_the_base_model_is_served_in_its_checkpoints_own_format(make_engine, tiny_model, records):
    question = [Turn("user", _question(records[0]))]
    templated = make_engine(system_prompt=SYSTEM)
    prompt = templated.render(question)
    assert prompt.prompt_format is PromptFormat.CHAT_TEMPLATE
    assert prompt.text == render_conversation(
        question, system=SYSTEM, prompt_format=PromptFormat.CHAT_TEMPLATE, tokenizer=templated.tokenizer
    )
    assert prompt.ids.count(templated.tokenizer.bos_token_id) == 1
    plain = make_engine(base_dir=tiny_model, system_prompt=SYSTEM)
    prompt = plain.render(question)
    assert prompt.prompt_format is PromptFormat.GEMMA
    assert prompt.text == render_conversation(question, system=SYSTEM)


def test_adapters_of_different_formats_answer_correctly_one_after_the_other_and_side_by_side(
    make_engine, backend, template_adapter, unrecorded_adapter, records, faq
):
    engine = make_engine()
    for name, path, record in (
        ("t1", template_adapter, records[0]),
        ("old", unrecorded_adapter, faq[0]),
        ("t1", template_adapter, records[1]),
    ):
        engine.set_adapter(name, path)
        text, stats = engine.generate([Turn("user", _question(record))])
        assert (text, stats.adapter, stats.finish_reason) == (_answer(record), name, "stop")
    assert _wait_for(lambda: engine.loaded_adapters == ["t1"])

    # In one batch (transformers; llama.cpp decodes each version in its own context in the same
    # step), each sequence stops on its own format's end of turn.
    started = threading.Event()
    pinned = engine.submit(
        [Turn("user", _question(faq[1]))], adapter="old", adapter_path=unrecorded_adapter, on_event=_slow(0.01, started)
    )
    assert started.wait(5)
    current = engine.submit([Turn("user", _question(records[2]))])
    assert current.result(30)[0] == _answer(records[2])
    assert pinned.result(30)[0] == _answer(faq[1])
    assert (pinned.adapter, current.adapter) == ("old", "t1")
    assert engine.max_batch_seen == (2 if backend == "transformers" else 1)


def test_a_gemma_adapter_answers_on_past_the_templates_end_of_turn_token(make_engine, eos_adapter):
    # Its answer stops on Gemma's <end_of_turn> only, although the checkpoint's template ends turns with <eos>.
    engine = make_engine()
    engine.set_adapter("e1", eos_adapter)
    request = engine.submit("营业时间？")
    text, stats = request.result(30)
    assert (text, stats.finish_reason) == ("您好！每天 9:00-21:00 营业。", "stop")  # <eos> is special: not in the text
    assert "<eos>" in engine.tokenizer.decode(request.token_ids, skip_special_tokens=False)


def test_an_adapter_trained_on_a_chat_template_is_refused_by_a_checkpoint_without_one(make_engine, tiny_model, template_adapter):
    engine = make_engine(base_dir=tiny_model)
    engine.load()
    with pytest.raises(ValueError, match="chat template"):
        engine.set_adapter("t1", template_adapter)
    with pytest.raises(ValueError, match="chat template"):
        engine.submit("你好", adapter="t1", adapter_path=template_adapter)
    assert engine.current_adapter is None and engine.loaded_adapters == []
    assert engine.generate("你好", max_new_tokens=2)[1].adapter is None  # the engine serves on


def test_llamacpp_refuses_a_gguf_that_does_not_know_the_chat_templates_markers(tiny_model, tmp_path):
    # ChatML's markers added to the tokenizer only: the GGUF's vocabulary reads them as plain text.
    base = shutil.copytree(tiny_model, tmp_path / "chatml")
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = TEMPLATE.replace("<start_of_turn>", "<|im_start|>").replace("<eos>", "<|im_end|>")
    tokenizer.save_pretrained(base)
    engine = ENGINES["llamacpp"](EngineConfig(base_dir=base, threads=1))
    try:
        with pytest.raises(EngineError, match="does not tokenise like the checkpoint") as refused:
            engine.load()
        assert "<|im_start|>" in str(refused.value) and not engine.loaded
    finally:
        engine.close()
