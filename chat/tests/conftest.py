"""Fixtures for the chat tests: the session's trained adapter (root conftest) served as the
active version, on one inference backend or both."""

import time

import pytest

from chat.answering import AnswerSession
from chat.serving import engine_config, get_engine, reset_engine
from training.tests.factories import make_adapter_version, make_base_model, make_run


@pytest.fixture(scope="session", autouse=True)
def _engine_closed_at_the_end():
    yield
    reset_engine()


# These modules run on both inference backends (issue #7); the others on transformers.
BOTH_BACKENDS = {"test_websocket", "test_openai", "test_browser", "test_grounded_chat"}


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
    run = make_run(base_model=make_base_model(path=tiny_model))
    return make_adapter_version("v1", path=trained_adapter, run=run, is_active=True)


@pytest.fixture
def held_after_the_first_token(monkeypatch):
    """The decode thread waits in the answer's callback after its first token until the request is
    cancelled (10 s at most), so a test of a cancel or a hang-up checks the cancel, not a race: the
    tiny model, drafting, can finish a memorised answer before the client's frame arrives (CI saw
    "stop"). Returns the list of tokens it held on (one, once it has)."""
    deliver = AnswerSession.on_event
    held = []

    def hold(session, event):
        from llm.engine.events import Token

        deliver(session, event)
        if isinstance(event, Token) and not held:
            held.append(event)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (session.request is not None and session.request.cancelled):
                time.sleep(0.005)

    monkeypatch.setattr(AnswerSession, "on_event", hold)
    return held
