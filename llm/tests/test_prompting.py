"""The one renderer picks the prompt format per checkpoint: its chat template when it has one,
else the built-in Gemma format; training records the choice with the adapter."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from llm.finetune.config import FinetuneConfig
from llm.finetune.data import IGNORE_INDEX, encode_example
from llm.finetune.loop import train
from llm.generation import end_of_turn_id, generate_answer, stop_token_ids
from llm.modeling import load_adapter
from llm.prompting import (
    END,
    START,
    PromptFormat,
    Turn,
    encode_prompt,
    prompt_format_for,
    question_text,
    read_prompt_format,
    render_conversation,
    render_training_example,
)
from tests.support.memorise import MEMORISE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Like Gemma's and Llama's templates it writes the BOS itself; its turns end with <eos>, a
# special token of the tiny tokenizer other than its EOS (<end_of_turn>), so a test can tell
# which format an answer ended in.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}: {{ m.content }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant: {% endif %}"
)
# Qwen's ChatML, on tokens added for it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Mistral's: no system role.
NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m.role }}] {{ m.content }}<eos>{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
RECORD = {"instruction": "如何退货？", "input": "订单号 123", "output": "您好！7天内可以无理由退货。"}


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)


@pytest.fixture
def templated(tokenizer):
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_a_tokenizer_with_a_chat_template_is_rendered_by_its_template(templated):
    assert prompt_format_for(templated) is PromptFormat.CHAT_TEMPLATE
    turns = [Turn("user", "在吗？"), Turn("assistant", "在的。"), Turn("user", "如何退货？")]
    text = render_conversation(turns, system="你是客服。", prompt_format=PromptFormat.CHAT_TEMPLATE, tokenizer=templated)
    assert text == (
        "<bos><start_of_turn>system: 你是客服。<eos><start_of_turn>user: 在吗？<eos>"
        "<start_of_turn>assistant: 在的。<eos><start_of_turn>user: 如何退货？<eos><start_of_turn>assistant: "
    )
    ids = encode_prompt(templated, text, PromptFormat.CHAT_TEMPLATE)
    assert ids.count(templated.bos_token_id) == 1  # the template's BOS, not a second one


def test_a_tokenizer_without_a_chat_template_gets_the_gemma_format(tokenizer):
    assert prompt_format_for(tokenizer) is PromptFormat.GEMMA
    text = render_conversation([Turn("user", "如何退货？")], system="你是客服。")
    assert text == f"{START}user\n你是客服。\n\n如何退货？{END}\n{START}model\n"
    assert encode_prompt(tokenizer, text, PromptFormat.GEMMA)[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("prompt_format", list(PromptFormat))
@pytest.mark.parametrize("system", ["", "你是星河商城的客服。"])
def test_training_export_and_inference_render_the_same_prompt_in_either_format(templated, prompt_format, system):
    example = encode_example(templated, RECORD, FinetuneConfig(system_prompt=system), prompt_format)
    answer_start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    served = render_conversation(
        [Turn("user", question_text(RECORD["instruction"], RECORD["input"]))],
        system=system, prompt_format=prompt_format, tokenizer=templated,
    )
    assert example["input_ids"][:answer_start] == encode_prompt(templated, served, prompt_format)

    # The answer, labelled alone, ends with the format's end-of-turn token: what generation stops on.
    answer = example["labels"][answer_start:]
    assert answer == example["input_ids"][answer_start:]
    assert answer[-1] == end_of_turn_id(templated, prompt_format) in stop_token_ids(templated, prompt_format)
    assert templated.decode(answer[:-1]) == RECORD["output"]

    # And the exported text is the conversation the engine would render with the answer in it.
    prompt, completion = render_training_example(
        RECORD["instruction"], RECORD["input"], RECORD["output"], system=system, prompt_format=prompt_format, tokenizer=templated
    )
    question_and_answer = [Turn("user", question_text(RECORD["instruction"], RECORD["input"])), Turn("assistant", RECORD["output"])]
    assert prompt == served
    assert prompt + completion == render_conversation(
        question_and_answer, system=system, add_generation_prompt=False, prompt_format=prompt_format, tokenizer=templated
    )


def test_each_format_ends_an_answer_with_its_own_end_of_turn_token(templated):
    assert templated.convert_ids_to_tokens(end_of_turn_id(templated, PromptFormat.GEMMA)) == END
    assert templated.convert_ids_to_tokens(end_of_turn_id(templated, PromptFormat.CHAT_TEMPLATE)) == "<eos>"


def test_a_chatml_answer_ends_with_im_end(tokenizer):
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHATML
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer, PromptFormat.CHAT_TEMPLATE) == im_end
    example = encode_example(tokenizer, RECORD, FinetuneConfig(), PromptFormat.CHAT_TEMPLATE)
    assert example["labels"][-1] == im_end
    answer_start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert tokenizer.decode(example["input_ids"][:answer_start]).endswith("<|im_start|>assistant\n")


def test_a_template_without_a_system_role_gets_the_system_prompt_in_the_first_user_turn(tokenizer):
    tokenizer.chat_template = NO_SYSTEM
    text = render_conversation(
        [Turn("user", "如何退货？")], system="你是客服。", prompt_format=PromptFormat.CHAT_TEMPLATE, tokenizer=tokenizer
    )
    assert text == "[user] 你是客服。\n\n如何退货？<eos>[assistant] "


def test_a_template_that_rewrites_answers_is_refused_for_training(tokenizer):
    tokenizer.chat_template = TEMPLATE.replace("{{ m.content }}", "{{ m.content | replace('退货', '换货') }}")
    with pytest.raises(ValueError, match="rewrites answers"):
        encode_example(tokenizer, RECORD, FinetuneConfig(), PromptFormat.CHAT_TEMPLATE)


def test_the_chat_template_format_needs_a_tokenizer_with_a_template(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        render_conversation([Turn("user", "?")], prompt_format=PromptFormat.CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="chat template"):
        render_conversation([Turn("user", "?")], prompt_format=PromptFormat.CHAT_TEMPLATE, tokenizer=tokenizer)


def test_an_adapter_without_a_recorded_format_reads_as_gemma(tmp_path):
    assert read_prompt_format(tmp_path) is PromptFormat.GEMMA  # nothing saved at all
    (tmp_path / "finetune_config.json").write_text(json.dumps(FinetuneConfig().to_dict()))  # saved before the record
    assert read_prompt_format(tmp_path) is PromptFormat.GEMMA
    (tmp_path / "finetune_config.json").write_text(json.dumps({**FinetuneConfig().to_dict(), "prompt_format": "chat_template"}))
    assert read_prompt_format(tmp_path) is PromptFormat.CHAT_TEMPLATE


def test_a_checkpoint_with_a_chat_template_trains_on_it_and_its_adapter_records_it(tiny_model, tmp_path):
    base = tmp_path / "templated-model"
    shutil.copytree(tiny_model, base)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    records = json.loads(open("data/train.json", encoding="utf-8").read())[:4]

    metrics = train(FinetuneConfig(**MEMORISE), base, records, [], tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    assert metrics["prompt_format"] == "chat_template"
    assert read_prompt_format(adapter) is PromptFormat.CHAT_TEMPLATE

    # Served in the recorded format, it answers what it learnt, and stops at the template's turn end.
    model, tokenizer = load_adapter(base, adapter)
    answers = [
        generate_answer(model, tokenizer, r["instruction"], r["input"], max_new_tokens=200, prompt_format=read_prompt_format(adapter))
        for r in records
    ]
    assert sum(a == r["output"].strip() for a, r in zip(answers, records)) >= 3
