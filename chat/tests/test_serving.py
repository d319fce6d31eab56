"""The process's engine (chat.serving): made from settings on the backend CSP_INFERENCE_BACKEND
names, shown in the admin, kept on the active version; and the start-up refusals of settings that
cannot serve. The engines themselves are tested in llm/tests/."""

import subprocess
import sys

import pytest
import torch
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse

from chat.serving import EngineHolder, engine_config, engine_status, get_engine, reset_engine
from llm.engine import LlamaCppEngine, OpenAIEngine
from llm.engine.config import HEAD_TYPES
from llm.tests.test_llamacpp_engine import _without_gguf
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, TrainingRun


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fresh_engine():
    reset_engine()
    yield
    reset_engine()


@pytest.mark.django_db
def test_the_process_engine_follows_the_setting_and_the_admin_shows_it(settings, tiny_model, tmp_path, cpu_only, fresh_engine, staff_client):
    settings.CSP_BASE_MODEL, settings.CSP_CHAT_DEVICE, settings.CSP_CHAT_DTYPE = tiny_model, "auto", "auto"
    settings.CSP_INFERENCE_BACKEND = "auto"
    assert isinstance(get_engine(), LlamaCppEngine)
    status = engine_status()
    assert status["backend"] == "llamacpp" and "model.gguf" in status["backend_reason"]
    page = staff_client.get(reverse("admin:training_adapterversion_changelist"), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Inference backend: llamacpp (auto: a CPU-only host" in page

    reset_engine()
    settings.CSP_INFERENCE_BACKEND = "llamacpp"
    settings.CSP_BASE_MODEL = _without_gguf(tiny_model, tmp_path)
    with pytest.raises(ImproperlyConfigured, match="CSP_INFERENCE_BACKEND=llamacpp: .*no GGUF file"):
        get_engine()


def test_an_unknown_backend_setting_stops_start_up_naming_the_variable():
    result = subprocess.run(
        [sys.executable, "-c", "import csplatform.settings"],
        env={"PATH": "/usr/bin:/bin", "CSP_INFERENCE_BACKEND": "gpu"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "CSP_INFERENCE_BACKEND='gpu' must be auto, transformers, llamacpp, worker or openai" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CSP_LLAMA_EXTRA_BUFFERS": "amx"}, "CSP_LLAMA_EXTRA_BUFFERS='amx' must be auto, on or off"),
        ({"CSP_LLAMA_HEAD_TYPE": "q4_k"},
         f"CSP_LLAMA_HEAD_TYPE='q4_k' must be empty (the GGUF as shipped) or one of {', '.join(HEAD_TYPES)}."),
        ({"CSP_RERANK_MIN_PROB": "often"}, "CSP_RERANK_MIN_PROB='often' is not a number"),
        ({"CSP_CONFIDENT_THRESHOLD": "sure"}, "CSP_CONFIDENT_THRESHOLD='sure' is not a number or 'off'"),
        ({"CSP_CONFIDENT_THRESHOLD": "4"}, "CSP_CONFIDENT_THRESHOLD=4.0 must be between 0 and 3"),
        ({"CSP_GROUNDING_K": "12"}, "CSP_GROUNDING_K=12 must be at most 9 with CSP_RERANK"),
    ],
)
def test_a_bad_serving_setting_stops_start_up_naming_the_variable(env, message):
    result = subprocess.run(
        [sys.executable, "-c", "import csplatform.settings"],
        env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_llama_output_layer_setting_reaches_the_engine_config_and_is_off_by_default(settings):
    assert engine_config().head_type == ""
    settings.CSP_LLAMA_HEAD_TYPE = "q4_0"
    assert engine_config().head_type == "q4_0"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CSP_INFERENCE_BACKEND": "worker"}, "CSP_INFERENCE_BACKEND=worker needs REDIS_URL"),
        ({"CSP_INFERENCE_BACKEND": "openai"}, "CSP_INFERENCE_BACKEND=openai needs CSP_OPENAI_BASE_URL"),
        ({"CSP_INFERENCE_BACKEND": "openai", "CSP_OPENAI_BASE_URL": "gpu-host:8000"}, "needs CSP_OPENAI_BASE_URL=http"),
    ],
)
def test_a_remote_backend_without_its_connection_stops_start_up(env, message):
    result = subprocess.run(
        [sys.executable, "-c", "import csplatform.settings"],
        env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.django_db
def test_the_active_version_reaches_the_engine_once_its_check_is_due(settings, tmp_path):
    # An openai engine only records the name new requests ask for: no model, no server needed.
    settings.CSP_INFERENCE_BACKEND, settings.CSP_OPENAI_BASE_URL = "openai", "http://127.0.0.1:9/v1"
    now = [100.0]
    holder = EngineHolder(clock=lambda: now[0], check_seconds=0.5)
    base = BaseModel.objects.create(name="tiny", path=str(tmp_path))
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path="/x", train_count=1, dev_count=0)
    run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
    v1 = AdapterVersion.objects.create(name="v1", run=run, base_model=base, path=str(tmp_path), is_active=True)
    try:
        engine = holder.active()
        assert isinstance(engine, OpenAIEngine) and engine.current_adapter == "v1"
        AdapterVersion.objects.filter(pk=v1.pk).update(is_active=False)
        second = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
        AdapterVersion.objects.create(name="v2", run=second, base_model=base, path=str(tmp_path), is_active=True)
        now[0] += 0.4
        assert holder.active().current_adapter == "v1"  # checked 0.4 s ago: not due yet
        now[0] += 0.1
        assert holder.active() is engine and engine.current_adapter == "v2"
    finally:
        holder.reset()
    assert holder.engine is None
