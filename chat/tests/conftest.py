"""Fixtures for the chat tests: a trained adapter served as the active version."""

import json

import pytest
from django.conf import settings

from chat.serving import engine_config, get_engine, reset_engine
from llm import finetune
from llm.gguf import write_lora_gguf
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
    write_lora_gguf(out / "adapter", base_dir=tiny_model)  # as a training run does: llama.cpp serves it too
    return out / "adapter"


@pytest.fixture(scope="session")
def second_adapter(tiny_model, faq, tmp_path_factory):
    """A barely trained adapter: its answers differ from the memorised ones."""
    out = tmp_path_factory.mktemp("chat-adapter-2")
    finetune.train(finetune.FinetuneConfig(epochs=1, learning_rate=1e-3, bf16="off"), tiny_model, faq, [], out)
    write_lora_gguf(out / "adapter", base_dir=tiny_model)
    return out / "adapter"


@pytest.fixture(scope="session", autouse=True)
def _engine_closed_at_the_end():
    yield
    reset_engine()


# These modules run on both inference backends (issue #7); the others on transformers.
BOTH_BACKENDS = {"test_websocket", "test_openai", "test_browser"}


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_BACKENDS:
        metafunc.parametrize("backend", ["transformers", "llamacpp"], indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request):
    """The inference backend a module's chats are served by."""
    return getattr(request, "param", "transformers")


def backend_settings(backend):
    """Settings (and env vars for a live server) that serve the tiny model on `backend`."""
    return {
        "CSP_CHAT_DEVICE": "cpu",
        "CSP_INFERENCE_BACKEND": backend,
        # transformers: fp32 as training evaluates; llama.cpp: the GGUF's own precision (f32 here)
        "CSP_CHAT_DTYPE": "float32" if backend == "transformers" else "auto",
        "CSP_CHAT_THREADS": "1",  # the test machine is shared: one llama.cpp thread decodes fastest
    }


@pytest.fixture
def serving(settings, training_env, tiny_model, trained_adapter, backend):
    """The tiny model with the trained adapter active as v1, on `backend`. The process's engine is
    kept between tests (loading it is the slow part); it only reloads what changed."""
    for name, value in backend_settings(backend).items():
        setattr(settings, name, int(value) if name == "CSP_CHAT_THREADS" else value)
    engine = get_engine()
    if engine.config != engine_config() or engine.backend != backend:  # made earlier with other settings
        reset_engine()
    base = BaseModel.objects.create(name="tiny", path=str(tiny_model))
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path="/x", train_count=6, dev_count=0)
    run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
    return AdapterVersion.objects.create(name="v1", run=run, base_model=base, path=str(trained_adapter), is_active=True)
