"""End-to-end fine-tuning on the tiny model (the `tiny_model` fixture in the root conftest).

The memorisation settings were measured: on 28 sample pairs, r=16 / alpha=32 / lr 1e-2 /
dropout 0 / 25 epochs reproduced 28 of 28 answers for three seeds; 30 epochs leave a margin.
"""

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from llm.basemodel import BaseModelError
from llm.finetune.checkpoints import list_checkpoints
from llm.finetune.config import FinetuneConfig
from llm.finetune.data import IGNORE_INDEX, collate, encode_example
from llm.finetune.kernels import head_cross_entropy, use_fast_lora_dropout
from llm.finetune.loop import TrainingCancelled, train, train_model
from llm.finetune.loss import answer_head_parts, answer_loss, checked_answer_head
from llm.generation import end_of_turn_id, generate_answer
from llm.modeling import add_lora, load_adapter, load_base
from llm.prompting import END, PromptFormat, Turn, question_text, read_prompt_format, render_conversation
from tests.support.memorise import MEMORISE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = "data/train.json"


@pytest.fixture(scope="module")
def records():
    with open(DATA, encoding="utf-8") as f:
        data = json.load(f)
    return data[::4][:28]  # every fourth pair: all seven categories


@pytest.fixture(scope="module")
def memorised(tiny_model, records, tmp_path_factory):
    """Train once for the module: (model, tokenizer, metrics, progress events, out_dir)."""
    out = tmp_path_factory.mktemp("run")
    events = []
    model, tokenizer, metrics = train_model(
        FinetuneConfig(**MEMORISE), tiny_model, records, records[:4], out, on_progress=events.append
    )
    return model, tokenizer, metrics, events, out


def _stop_after(events, steps):
    """A should_stop that says stop once `steps` progress events arrived."""
    return lambda: len(events) >= steps


def _max_new_tokens(tokenizer, records):
    return max(len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in records) + 8


def _answers(model, tokenizer, records):
    limit = _max_new_tokens(tokenizer, records)
    return [generate_answer(model, tokenizer, r["instruction"], r["input"], max_new_tokens=limit) for r in records]


def test_trained_adapter_reproduces_the_trained_answers(memorised, records):
    model, tokenizer, metrics, _, _ = memorised
    answers = _answers(model, tokenizer, records)
    exact = sum(a == r["output"].strip() for a, r in zip(answers, records))
    assert exact >= 0.9 * len(records), f"{exact}/{len(records)} reproduced; loss {metrics['final_train_loss']:.3f}"


def test_base_model_without_adapter_reproduces_none(tiny_model, records):
    model, tokenizer = load_base(tiny_model, FinetuneConfig())
    answers = _answers(model, tokenizer, records)
    assert not any(a == r["output"].strip() for a, r in zip(answers, records))


def test_adapter_reloaded_from_disk_answers_like_the_trained_model(memorised, tiny_model, records):
    model, tokenizer, _, _, out = memorised
    reloaded, reloaded_tokenizer = load_adapter(tiny_model, out / "adapter")
    sample = records[:8]
    assert _answers(reloaded, reloaded_tokenizer, sample) == _answers(model, tokenizer, sample)


def test_run_writes_adapter_config_and_metrics_and_no_checkpoints(memorised, records):
    _, _, metrics, _, out = memorised
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    saved_config = json.loads((out / "finetune_config.json").read_text())
    assert saved_config["lora_r"] == 16 and saved_config["target_modules"] == "all-linear"
    assert json.loads((out / "adapter" / "finetune_config.json").read_text()) == saved_config
    # The tiny model has no chat template: trained, and to be served, in the Gemma format.
    assert saved_config["prompt_format"] == metrics["prompt_format"] == "gemma"
    assert read_prompt_format(out / "adapter") is PromptFormat.GEMMA
    assert json.loads((out / "metrics.json").read_text())["steps"] == metrics["steps"]
    assert not (out / "checkpoints").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    steps_per_epoch = 7  # 28 pairs, batch 4
    assert metrics["steps"] == 30 * steps_per_epoch == len(metrics["train_loss"])
    assert len(metrics["dev_loss"]) == 30
    assert metrics["final_train_loss"] < 0.5 < metrics["train_loss"][0]
    assert metrics["tokens_per_s"] > 0 and metrics["seconds"] > 0
    assert metrics["examples"] == len(records) and metrics["truncated_examples"] == 0


def test_progress_is_reported_every_step_with_dev_loss_at_epoch_ends(memorised):
    _, _, metrics, events, _ = memorised
    assert [e["step"] for e in events] == list(range(1, metrics["steps"] + 1))
    assert {"step", "total_steps", "epoch", "loss", "lr", "elapsed_s", "eta_s"} <= events[0].keys()
    assert all(e["total_steps"] == metrics["steps"] for e in events)
    assert [e["step"] for e in events if "dev_loss" in e] == list(range(7, metrics["steps"] + 1, 7))
    assert events[-1]["eta_s"] == 0 and events[-1]["epoch"] == 30
    # Linear schedule: warm up, then decay towards zero.
    lrs = [e["lr"] for e in events]
    assert max(lrs) == pytest.approx(1e-2, rel=0.05) and lrs[-1] < lrs[len(lrs) // 2] < max(lrs)


def test_loss_is_on_answer_tokens_only(tiny_model, records):
    model, tokenizer = load_base(tiny_model, FinetuneConfig())
    config = FinetuneConfig()
    example = encode_example(tokenizer, records[0], config)
    answer_start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    prompt_ids = example["input_ids"][:answer_start]
    assert tokenizer.decode(prompt_ids, skip_special_tokens=False).endswith("<start_of_turn>model\n")
    assert example["labels"][answer_start:] == example["input_ids"][answer_start:]
    assert example["labels"][-1] == end_of_turn_id(tokenizer) == tokenizer.eos_token_id
    assert tokenizer.decode(example["labels"][answer_start:]) == records[0]["output"].strip() + END

    # Padding gets no loss either, and the model's loss equals cross-entropy over answer tokens only.
    short = encode_example(tokenizer, {"instruction": "发票？", "input": "", "output": "可以开。"}, config)
    batch = collate([example, short], tokenizer.pad_token_id)
    assert (batch["labels"][1, len(short["input_ids"]) :] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][1, len(short["input_ids"]) :] == 0).all()
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    answer = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[answer], labels[answer])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    real = batch["attention_mask"][:, 1:] == 1
    everything = torch.nn.functional.cross_entropy(logits[real], batch["input_ids"][:, 1:][real])
    assert abs(everything.item() - expected.item()) > 1e-3  # so the prompt really would have counted


def _lora_batch(tiny_model, records):
    """A LoRA-wrapped tiny model (fp32, adapters non-zero) and a padded three-example batch."""
    model, tokenizer = load_base(tiny_model, FinetuneConfig())
    torch.manual_seed(0)
    model = add_lora(model, FinetuneConfig(lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at init, so the adapters would not yet change the logits
            torch.nn.init.normal_(param, std=0.05)
    config = FinetuneConfig()
    examples = [encode_example(tokenizer, r, config) for r in records[:3]]
    return model, tokenizer, collate(examples, tokenizer.pad_token_id)


def test_answer_only_head_gives_the_full_models_loss_and_gradients(tiny_model, records):
    model, _, batch = _lora_batch(tiny_model, records)
    assert batch["attention_mask"].eq(0).any()  # padding is in the batch
    parts = answer_head_parts(model)
    assert parts is not None

    fast = answer_loss(model, batch, parts)
    fast.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    full = model(**batch).loss  # transformers' own loss over the logits at every position
    full.backward()

    assert fast.item() == pytest.approx(full.item(), rel=1e-6)
    full_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(fast_grads) == len(full_grads) > 0
    for name, grad in full_grads.items():  # gradients up to 0.2; fp32 summation order differs
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert answer_loss(model, batch).item() == pytest.approx(full.item(), rel=1e-6)  # the fallback path too


def test_fused_head_cross_entropy_is_exact_across_vocabulary_and_row_chunks():
    # The tiny model's vocabulary fits one chunk; here the online softmax has to rescale.
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=False).requires_grad_(False)
    hidden = (torch.randn(20, 32) * 3).requires_grad_()
    labels = torch.randint(0, 1000, (20,))
    expected = torch.nn.functional.cross_entropy(head(hidden), labels, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)

    fused = head_cross_entropy(hidden, head, labels, reduction="sum", row_chunk=7, vocab_chunk=128)
    (grad,) = torch.autograd.grad(fused, hidden)
    assert fused.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # loss only: no gradient pass
        assert head_cross_entropy(hidden, head, labels, vocab_chunk=128).item() == pytest.approx(expected.item() / 20, rel=1e-6)


def test_answer_only_head_is_refused_for_logits_it_does_not_know(tiny_model, records):
    model, tokenizer, batch = _lora_batch(tiny_model, records)
    example = encode_example(tokenizer, records[0], FinetuneConfig())
    device = torch.device("cpu")
    assert checked_answer_head(model, example, tokenizer.pad_token_id, device, False) is not None

    # Like Granite's logits_scaling: the model post-processes logits after its head.
    base = model.get_base_model()
    forward = base.forward

    def scaled_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits / 4
        return out

    base.forward = scaled_forward
    assert checked_answer_head(model, example, tokenizer.pad_token_id, device, False) is None


def test_fast_lora_dropout_drops_p_of_the_inputs_and_keeps_the_mean(tiny_model):
    model, _ = load_base(tiny_model, FinetuneConfig())
    model = add_lora(model, FinetuneConfig(lora_dropout=0.1))
    use_fast_lora_dropout(model)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m).__name__ == "FastDropout" and m.p == 0.1 for m in dropouts)

    dropout = dropouts[0].train()
    x = torch.ones(1000, 1000)
    torch.manual_seed(1)
    y = dropout(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    kept = y.unique().tolist()
    assert len(kept) == 2 and kept[0] == 0.0 and kept[1] == pytest.approx(1 / 0.9, rel=1e-3)  # kept ones scaled up
    torch.manual_seed(1)
    assert torch.equal(dropout(x), y)  # the seed decides the mask
    assert torch.equal(dropout.eval()(x), x)


def test_training_prompt_is_token_for_token_the_generation_prompt(tiny_model, records):
    _, tokenizer = load_base(tiny_model, FinetuneConfig())
    record = records[1]
    for system in ("", "你是星河商城的客服。"):
        example = encode_example(tokenizer, record, FinetuneConfig(system_prompt=system))
        answer_start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        served = render_conversation([Turn("user", question_text(record["instruction"], record["input"]))], system=system)
        assert example["input_ids"][:answer_start] == tokenizer(served)["input_ids"]
        if system:
            assert system in tokenizer.decode(example["input_ids"][:answer_start])


def test_long_examples_keep_the_prompt_and_lose_the_answers_tail(tiny_model, records):
    _, tokenizer = load_base(tiny_model, FinetuneConfig())
    example = encode_example(tokenizer, records[0], FinetuneConfig(max_length=40))
    assert len(example["input_ids"]) == 40 and example["truncated"]
    assert example["labels"][0] == IGNORE_INDEX and example["labels"][-1] != IGNORE_INDEX
    assert encode_example(tokenizer, records[0], FinetuneConfig(max_length=5)) is None


def test_should_stop_cancels_within_one_step_and_writes_no_adapter(tiny_model, records, tmp_path):
    events = []
    with pytest.raises(TrainingCancelled):
        train(
            FinetuneConfig(epochs=2),
            tiny_model,
            records[:12],
            [],
            tmp_path,
            on_progress=events.append,
            should_stop=_stop_after(events, 2),
        )
    assert [e["step"] for e in events] == [1, 2]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()


def test_interrupted_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tiny_model, records, tmp_path):
    config = FinetuneConfig(epochs=3, batch_size=4, checkpoint_every=2, lora_dropout=0.1)
    pairs = records[:8]  # 2 steps per epoch, 6 in all
    events = []
    with pytest.raises(TrainingCancelled):
        train(config, tiny_model, pairs, [], tmp_path / "run", on_progress=events.append, should_stop=_stop_after(events, 3))
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "run" / "adapter").exists()

    resumed_events = []
    metrics = train(config, tiny_model, pairs, [], tmp_path / "run", on_progress=resumed_events.append, resume=True)
    assert [e["step"] for e in resumed_events] == [3, 4, 5, 6]
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    # Optimizer, schedule, batch order and dropout RNG all came back: same losses as one go.
    straight = train(config, tiny_model, pairs, [], tmp_path / "straight")
    assert metrics["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-4)


def test_a_run_shorter_than_checkpoint_every_is_checkpointed_by_time_and_resumes_from_there(tiny_model, records, tmp_path):
    # A second of training is past at every step here: each step is due by time, none by steps.
    config = FinetuneConfig(epochs=2, batch_size=4, checkpoint_every=50, checkpoint_seconds=1e-6, keep_checkpoints=0)
    pairs = records[:12]  # 3 steps per epoch, 6 in all
    events = []
    with pytest.raises(TrainingCancelled):
        train(config, tiny_model, pairs, [], tmp_path, on_progress=events.append, should_stop=_stop_after(events, 2))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2]

    # The interval is bookkeeping: a resume under another one still matches the checkpoint.
    resumed_events = []
    later = FinetuneConfig(epochs=2, batch_size=4, checkpoint_every=50, checkpoint_seconds=300)
    metrics = train(later, tiny_model, pairs, [], tmp_path, on_progress=resumed_events.append)
    assert metrics["resumed_from_step"] == 2 and [e["step"] for e in resumed_events] == [3, 4, 5, 6]


def test_each_epoch_end_is_checkpointed_when_checkpoints_are_on(tiny_model, records, tmp_path):
    config = FinetuneConfig(epochs=3, batch_size=4, checkpoint_every=0, checkpoint_seconds=3600, keep_checkpoints=0)
    events = []
    with pytest.raises(TrainingCancelled):
        train(config, tiny_model, records[:8], [], tmp_path, on_progress=events.append, should_stop=_stop_after(events, 5))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]  # 2 steps per epoch; step 5 is mid-epoch


def test_no_checkpoint_is_written_when_both_intervals_are_off(tiny_model, records, tmp_path):
    events = []
    with pytest.raises(TrainingCancelled):
        train(
            FinetuneConfig(epochs=3, checkpoint_every=0, checkpoint_seconds=0), tiny_model, records[:8], [], tmp_path,
            on_progress=events.append, should_stop=_stop_after(events, 5),
        )
    assert list_checkpoints(tmp_path) == []


def test_resume_refuses_a_checkpoint_from_other_data(tiny_model, records, tmp_path):
    config = FinetuneConfig(epochs=2, checkpoint_every=1)
    events = []
    with pytest.raises(TrainingCancelled):
        train(config, tiny_model, records[:4], [], tmp_path, on_progress=events.append, should_stop=_stop_after(events, 1))
    with pytest.raises(ValueError, match="other data"):
        train(config, tiny_model, records[4:8], [], tmp_path, resume=True)
    # Without resume the stale checkpoints are discarded and training starts over.
    assert train(config, tiny_model, records[4:8], [], tmp_path, resume=False)["resumed_from_step"] is None


def test_qlora_4bit_trains_on_cpu_and_the_loss_falls(tiny_model, records, tmp_path):
    config = FinetuneConfig(quantization="4bit", lora_r=16, learning_rate=1e-2, epochs=3, lora_dropout=0.0)
    model, tokenizer, metrics = train_model(config, tiny_model, records[:8], records[8:10], tmp_path)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    assert metrics["steps"] == 6
    # The dev loss between epochs must not put the 4-bit layers in inference form (bitsandbytes
    # repacks them on an eval-mode forward, after which they cannot train).
    assert len(metrics["dev_loss"]) == 3
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] - 0.5
    assert isinstance(generate_answer(model, tokenizer, records[0]["instruction"], max_new_tokens=5), str)


def test_missing_base_model_is_a_clear_error_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BaseModelError, match="no-such-model"):
        load_base(missing, FinetuneConfig())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(BaseModelError, match="broken"):
        load_base(tmp_path / "broken", FinetuneConfig())


def test_config_refuses_unknown_choices():
    with pytest.raises(ValueError):
        FinetuneConfig(quantization="8bit")
    with pytest.raises(ValueError):
        FinetuneConfig(bf16="maybe")
    with pytest.raises(ValueError):
        FinetuneConfig(base_dtype="fp16")
    with pytest.raises(ValueError):
        FinetuneConfig(checkpoint_seconds=-1)
    assert FinetuneConfig.from_dict({"lora_r": 4, "unknown": 1}).lora_r == 4


def test_importing_the_finetune_config_does_not_import_torch():
    # The Django side builds a FinetuneConfig in every process (training/services.py).
    code = "import llm.finetune.config, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
