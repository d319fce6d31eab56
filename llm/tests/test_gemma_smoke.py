"""Smoke test on the real embedded base model (minutes of CPU; run with `make test-slow`)."""

import json

import pytest
from django.conf import settings

from llm.basemodel import prepare_gemma
from llm.finetune.config import FinetuneConfig
from llm.finetune.loop import train
from llm.generation import generate_answer
from llm.modeling import load_adapter


@pytest.mark.slow
def test_gemma_converts_and_a_few_lora_steps_lower_the_loss(tmp_path):
    target = settings.DATA_DIR / "models" / "gemma-3-270m"  # reused when already prepared
    base = prepare_gemma(target)
    records = json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[:8]
    config = FinetuneConfig(epochs=4, batch_size=4, max_length=160, learning_rate=2e-3)
    losses = []
    metrics = train(config, base, records, records[:2], tmp_path / "run", on_progress=lambda info: losses.append(info["loss"]))
    assert metrics["steps"] == 8 and len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2])
    model, tokenizer = load_adapter(base, tmp_path / "run" / "adapter")
    answer = generate_answer(model, tokenizer, records[0]["instruction"], max_new_tokens=24)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in answer)  # Chinese comes out
