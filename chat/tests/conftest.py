"""Fixtures for the chat tests: a trained adapter served as the active version."""

import json

import pytest
from django.conf import settings

from chat.serving import engine_config, get_engine, reset_engine
from training import finetune
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, TrainingRun

# Settings that make the tiny model memorise a handful of answers in seconds.
MEMORISE = finetune.FinetuneConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-2, epochs=30, batch_size=4, bf16="off")


@pytest.fixture(scope="session")
def faq():
    return json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[:6]


@pytest.fixture(scope="session")
def trained_adapter(tiny_model, faq, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-adapter")
    finetune.train(MEMORISE, tiny_model, faq, [], out)
    return out / "adapter"


@pytest.fixture(scope="session")
def second_adapter(tiny_model, faq, tmp_path_factory):
    """A barely trained adapter: its answers differ from the memorised ones."""
    out = tmp_path_factory.mktemp("chat-adapter-2")
    finetune.train(finetune.FinetuneConfig(epochs=1, learning_rate=1e-3, bf16="off"), tiny_model, faq, [], out)
    return out / "adapter"


@pytest.fixture(scope="session", autouse=True)
def _engine_closed_at_the_end():
    yield
    reset_engine()


@pytest.fixture
def serving(settings, training_env, tiny_model, trained_adapter):
    """The tiny model with the trained adapter active as v1. The process's engine is kept between
    tests (loading it is the slow part); it only reloads what changed."""
    settings.CSP_CHAT_DEVICE = "cpu"
    settings.CSP_CHAT_DTYPE = "float32"
    if get_engine().config != engine_config():  # made earlier (e.g. by the schema test) with other settings
        reset_engine()
    base = BaseModel.objects.create(name="tiny", path=str(tiny_model))
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path="/x", train_count=6, dev_count=0)
    run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
    return AdapterVersion.objects.create(name="v1", run=run, base_model=base, path=str(trained_adapter), is_active=True)
