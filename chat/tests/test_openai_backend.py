"""The `openai` inference backend (issue #6): an OpenAIEngine here, answered by an OpenAI-compatible
server elsewhere. The stand-in for vLLM is this platform's own /v1/chat/completions in a live daphne
(the tiny model, the trained adapter active as v1), which names versions as vLLM's --lora-modules do.

The stand-in decodes one answer at a time and queues none (CSP_CHAT_MAX_ACTIVE=1,
CSP_CHAT_MAX_WAITING=0), so two concurrent requests make it busy; each test therefore waits for
the stand-in to have stored its answers before the next one starts. The last test runs a second
daphne with CSP_INFERENCE_BACKEND=openai in front of it and chats over its websocket.
"""

import asyncio
import json
import secrets
import sqlite3
import threading
import time
import urllib.request
from contextlib import closing

import pytest
import websocket
from django.contrib.sessions.backends.db import SessionStore
from django.db import connection
from rest_framework.authtoken.models import Token

from llm.engine import CANCELLED, STOP, EngineBusy, EngineConfig, EngineError, InputTooLong
from llm.engine import Token as TextToken
from llm.engine.events import FILTERED, Done
from llm.engine.openai import OpenAIEngine, UnknownModel
from chat.models import Conversation, Message
from chat.serving import active_engine, reset_engine
from chat.tests.conftest import backend_settings
from tests.support.livetest import free_port, live_daphne
from training.models import AdapterVersion, TrainingRun
from training.services import adapter_version_activate

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.live]

# The stand-in's API key: a DRF token key, chosen up front (a web process in front of the stand-in
# gets it in its environment) and stored for a staff user by each test (the database is emptied
# between tests). Staff, because the platform is the operator of the vLLM it stands in for: that
# server serves every version and the base model by name, which /v1 allows staff only.
API_KEY = secrets.token_hex(20)


@pytest.fixture(scope="module")
def backend():
    """The stand-in serves on llama.cpp: it starts in a second or two (no torch to import)."""
    return "llamacpp"


@pytest.fixture(scope="module")
def server(django_db_setup, tiny_model, tmp_path_factory, backend):
    data_dir = tmp_path_factory.mktemp("openai-stand-in")
    env = {
        "CSP_DATA_DIR": str(data_dir), "CSP_BASE_MODEL": str(tiny_model), **backend_settings(backend),
        "CSP_CHAT_MAX_ACTIVE": "1", "CSP_CHAT_MAX_WAITING": "0",
    }
    with live_daphne(env=env, log=data_dir / "daphne.log") as url:
        yield url


@pytest.fixture
def api_key(serving, staff_user):
    return Token.objects.create(user=staff_user, key=API_KEY).key


def _settled(timeout=15):
    """Wait until the stand-in has stored every answer it started (its only slot is free then)."""
    deadline = time.monotonic() + timeout
    while Message.objects.filter(role="assistant", finish_reason="").exists():
        assert time.monotonic() < deadline, "the stand-in did not finish its answers"
        time.sleep(0.05)


@pytest.fixture
def engine(server, api_key):
    engine = OpenAIEngine(EngineConfig(remote_url=f"{server}/v1", remote_api_key=api_key, max_seconds=30))
    engine.set_adapter("v1")
    yield engine
    engine.close()
    _settled()


def _stand_in(server, model, question):
    """The stand-in's own (model, answer) for `question`, asked without the engine."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}]}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"{server}/v1/chat/completions", body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        completion = json.load(response)
    return completion["model"], completion["choices"][0]["message"]["content"]


def _version(name, path, active):
    run = TrainingRun.objects.create(base_model=active.base_model, snapshot=active.run.snapshot, status="succeeded")
    return AdapterVersion.objects.create(name=name, run=run, base_model=active.base_model, path=str(path))


def test_generated_and_streamed_answers_are_the_stand_ins_own(engine, server, faq):
    question = faq[0]["instruction"]
    assert _stand_in(server, "v1", question) == ("v1", faq[0]["output"])

    text, stats = engine.generate(question, timeout=60)

    async def stream():
        return [event async for event in engine.stream(faq[1]["instruction"])]

    events = asyncio.run(stream())
    assert text == faq[0]["output"] and stats.adapter == "v1" and stats.finish_reason == STOP
    assert stats.tokens > 0 and stats.prompt_tokens > 0 and stats.latency_ms >= stats.first_token_ms > 0
    pieces = [event.text for event in events if isinstance(event, TextToken)]
    assert len(pieces) > 1 and "".join(pieces) == faq[1]["output"]
    assert isinstance(events[-1], Done) and events[-1].stats.finish_reason == STOP and events[-1].stats.adapter == "v1"
    print(f"\nopenai backend: {stats.tokens} tokens, first token {stats.first_token_ms:.0f} ms, all {stats.latency_ms:.0f} ms")


def test_a_pinned_version_and_the_base_model_are_asked_for_by_name(engine, server, trained_adapter, faq):
    engine.set_adapter(None)  # unpinned requests would go to the base model: the pins decide here
    question = faq[0]["instruction"]

    v1_text, v1_stats = engine.generate(question, adapter="v1", adapter_path=str(trained_adapter), timeout=60)
    base_text, base_stats = engine.generate(question, adapter=None, timeout=60)

    assert (v1_stats.adapter, v1_text) == ("v1", faq[0]["output"])
    assert base_stats.adapter is None and ("base", base_text) == _stand_in(server, "base", question)
    assert base_text != v1_text
    # The stand-in stored who answered: v1, the base model (and the base model asked directly).
    names = Message.objects.filter(role="assistant").order_by("created_at", "pk").values_list("adapter_name", flat=True)
    assert list(names) == ["v1", "", ""]


def test_an_unknown_version_is_refused_by_name(engine, faq):
    with pytest.raises(UnknownModel, match="v99"):
        engine.generate(faq[0]["instruction"], adapter="v99")


def test_the_active_version_is_followed_after_an_activation(settings, server, api_key, serving, second_adapter, faq):
    settings.CSP_INFERENCE_BACKEND = "openai"
    settings.CSP_OPENAI_BASE_URL, settings.CSP_OPENAI_API_KEY = f"{server}/v1", api_key
    reset_engine()
    question = faq[0]["instruction"]
    try:
        before = active_engine()
        text_before, stats_before = before.generate(question, timeout=60)
        adapter_version_activate(version=_version("v2", second_adapter, serving), force=True)
        deadline = time.monotonic() + 5  # the active-version check is due within ACTIVE_CHECK_SECONDS
        while (after := active_engine()).current_adapter != "v2" and time.monotonic() < deadline:
            time.sleep(0.05)
        text_after, stats_after = after.generate(question, timeout=60)
    finally:
        reset_engine()
        _settled()

    assert isinstance(before, OpenAIEngine) and after is before and after.current_adapter == "v2"
    assert (stats_before.adapter, text_before) == ("v1", faq[0]["output"])
    assert ("v2", text_after) == (stats_after.adapter, _stand_in(server, "v2", question)[1]) and text_after != text_before


def test_the_leak_guard_stops_an_answer_that_prints_a_canary(server, api_key, faq):
    answer = faq[0]["output"]
    canary = answer[len(answer) // 2 :][:12]  # v1 says it word for word: the server knows no canaries
    config = EngineConfig(remote_url=f"{server}/v1", remote_api_key=api_key, canaries=(canary,))
    with closing(OpenAIEngine(config)) as engine:
        engine.set_adapter("v1")
        text, stats = engine.generate(faq[0]["instruction"], timeout=60)
    _settled()

    assert stats.finish_reason == FILTERED and canary not in text and answer.startswith(text)
    print(f"\nleak guard: {len(text)} of {len(answer)} characters sent")


def test_a_cancel_stops_the_remote_answer(engine, faq):
    first = threading.Event()
    # Sampled hot, the adapter wanders off its memorised answer and runs to max_new_tokens.
    request = engine.submit(
        faq[0]["instruction"], temperature=1.5, seed=0, on_event=lambda event: isinstance(event, TextToken) and first.set()
    )
    assert first.wait(30)
    request.cancel()

    _text, stats = request.result(5)
    _settled()
    there = Message.objects.get(role="assistant")
    assert stats.finish_reason == CANCELLED and there.finish_reason == "cancelled"
    assert there.tokens < engine.config.max_new_tokens
    print(f"\ncancelled: {stats.tokens} tokens read here, {there.tokens} generated there")


def test_a_busy_server_is_engine_busy_with_its_retry_after(engine, faq):
    held = engine.submit(faq[0]["instruction"], temperature=1.5, seed=0)
    try:
        with pytest.raises(EngineBusy) as caught:
            engine.submit(faq[1]["instruction"])
    finally:
        held.cancel()
        held.result(5)

    assert caught.value.retry_after >= 1
    print(f"\nbusy: retry after {caught.value.retry_after} s")


def test_a_message_too_long_for_the_server_is_input_too_long(engine):
    with pytest.raises(InputTooLong, match="2000"):
        engine.submit("问" * 3000)

    assert not Conversation.objects.exists()


def test_a_wrong_api_key_is_an_engine_error_that_names_the_key(server, serving, faq):
    with closing(OpenAIEngine(EngineConfig(remote_url=f"{server}/v1", remote_api_key="not-a-token"))) as engine:
        with pytest.raises(EngineError, match="API key"):
            engine.generate(faq[0]["instruction"])


def test_a_wrong_path_is_an_engine_error_not_an_unknown_model(server, api_key, faq):
    with closing(OpenAIEngine(EngineConfig(remote_url=f"{server}/nothing/v1", remote_api_key=api_key))) as engine:
        with pytest.raises(EngineError, match="HTTP 404") as caught:
            engine.generate(faq[0]["instruction"])

    assert not isinstance(caught.value, UnknownModel)


def test_a_closed_port_is_an_engine_error_at_once():
    with closing(OpenAIEngine(EngineConfig(remote_url=f"http://127.0.0.1:{free_port()}/v1"))) as engine:
        started = time.monotonic()
        with pytest.raises(EngineError, match="cannot be reached"):
            engine.generate("如何退货？")
        elapsed = time.monotonic() - started

        assert elapsed < 2 and not engine.metrics()["running"]
    print(f"\nclosed port refused in {elapsed * 1000:.0f} ms")


def _own_database(tmp_path):
    """DATABASE_URL of a copy of the test database, on SQLite (else {}: the shared one will do).

    The web process stores the question and submits in one transaction, so on SQLite it holds the
    write lock until the stand-in accepts, and the stand-in cannot store its own record before
    accepting: with one SQLite file the two would wait for each other (vLLM writes nothing)."""
    if connection.vendor != "sqlite":
        return {}
    copy = tmp_path / "web.sqlite3"
    with sqlite3.connect(connection.settings_dict["NAME"]) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    return {"DATABASE_URL": f"sqlite:///{copy}"}


def test_a_websocket_chat_on_the_openai_backend_streams_the_stand_ins_answer(server, api_key, faq, tmp_path):
    session = SessionStore()
    session.create()
    # A web process with no model of its own: every answer comes from the stand-in.
    env = {
        "CSP_DATA_DIR": str(tmp_path), "CSP_INFERENCE_BACKEND": "openai",
        "CSP_OPENAI_BASE_URL": f"{server}/v1", "CSP_OPENAI_API_KEY": api_key, **_own_database(tmp_path),
    }
    with live_daphne(env=env, log=tmp_path / "daphne.log") as url:
        socket = websocket.create_connection(
            f"ws://{url.removeprefix('http://')}/ws/chat/", origin=url, cookie=f"sessionid={session.session_key}", timeout=30
        )
        try:
            socket.send(json.dumps({"type": "message", "text": faq[0]["instruction"], "conversation": None}))
            frames = [json.loads(socket.recv())]
            while frames[-1]["type"] not in ("done", "error", "busy"):
                frames.append(json.loads(socket.recv()))
        finally:
            socket.close()
    _settled()

    start, done = frames[0], frames[-1]
    assert start["type"] == "start" and start["adapter"] == "v1", frames
    assert "".join(f["text"] for f in frames if f["type"] == "token") == faq[0]["output"]
    assert done["type"] == "done" and done["finish_reason"] == "stop" and done["tokens"] > 0 and done["adapter"] == "v1"
    # The stand-in stored the request it answered, as it stores any /v1 request.
    assert Message.objects.get(role="assistant", conversation__channel="openai").text == faq[0]["output"]
    print(f"\nwebsocket via the openai backend: {done['tokens']} tokens, first token {done['first_token_ms']:.0f} ms, "
          f"all {done['latency_ms']:.0f} ms")
