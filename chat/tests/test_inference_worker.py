"""Scale-out serving for real: two daphne processes, no shared memory, one dedicated inference
worker (`manage.py inference_worker`) reached through channels-redis on the local Redis, all on
the test database. Both web processes stream from the one worker; an activation reaches it; with
no worker running a chat is refused with a clear error instead of hanging."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import websocket
from django.core.cache.backends.redis import RedisCache
from rest_framework.authtoken.models import Token

from chat.inference.client import WORKERS_KEY, WorkerEngine
from chat.serving import active_engine, engine_config
from chat.tests.conftest import backend_settings
from tests.support.livetest import ROOT, TEST_REDIS_URL, database_env, live_daphne, stop
from training.models import AdapterVersion, TrainingRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.live, pytest.mark.services]

QUESTION = "如何申请退货？"


@contextmanager
def live_worker(*, env, log, timeout=120):
    """`manage.py inference_worker` in its own process group, once it says it is ready."""
    process = subprocess.Popen(
        [sys.executable, "manage.py", "inference_worker", "--backend", env["CSP_INFERENCE_BACKEND"]],
        cwd=ROOT, env={**os.environ, **database_env(), **env}, start_new_session=True,
        stdout=Path(log).open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    try:
        while "ready on" not in Path(log).read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the inference worker did not start:\n" + Path(log).read_text()[-3000:])
            time.sleep(0.2)
        yield process
    finally:
        stop(process)


def chat(url, text, timeout=60):
    """One websocket chat: (frames other than tokens, the streamed text)."""
    host = url.removeprefix("http://")
    socket = websocket.create_connection(f"ws://{host}/ws/chat/", origin=url, timeout=timeout)
    frames, text_out = [], []
    try:
        socket.send(json.dumps({"type": "message", "text": text}))
        while True:
            frame = json.loads(socket.recv())
            if frame["type"] == "token":
                text_out.append(frame["text"])
                continue
            frames.append(frame)
            if frame["type"] in ("done", "error", "busy"):
                return frames, "".join(text_out)
    finally:
        socket.close()


@pytest.fixture
def scaleout_env(serving, training_env, tiny_model, redis_channel_layer):
    """Env of the scale-out processes: the tiny model, the test database, Redis (layer and cache)."""
    return {"CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model), **redis_channel_layer}


@pytest.fixture
def redis_cache(redis_channel_layer):
    cache = RedisCache(TEST_REDIS_URL, {})
    cache.delete(WORKERS_KEY)
    return cache


def test_two_web_processes_stream_from_one_worker_that_follows_activation(
    scaleout_env, redis_cache, second_adapter, training_env, backend
):
    expected, _stats = active_engine().generate(QUESTION)  # what v1 answers, in this process
    worker_env = {**scaleout_env, **backend_settings(backend)}
    web_env = {**scaleout_env, "CSP_INFERENCE_BACKEND": "worker"}
    with (
        live_worker(env=worker_env, log=training_env / "worker.log"),
        live_daphne(env=web_env, log=training_env / "web-a.log") as web_a,
        live_daphne(env=web_env, log=training_env / "web-b.log") as web_b,
    ):
        for url in (web_a, web_b):
            frames, text = chat(url, QUESTION)
            start, done = frames[0], frames[-1]
            assert start["type"] == "start" and start["adapter"] == "v1", frames
            assert done["type"] == "done" and done["finish_reason"] in ("stop", "length"), frames
            assert text == expected

        # staff activate v2: the worker, not the web processes, picks it up for the next answer
        v1 = AdapterVersion.objects.get(name="v1")
        AdapterVersion.objects.filter(pk=v1.pk).update(is_active=False)
        run = TrainingRun.objects.create(base_model=v1.base_model, snapshot=v1.run.snapshot, status="succeeded")
        AdapterVersion.objects.create(name="v2", run=run, base_model=v1.base_model, path=str(second_adapter), is_active=True)
        time.sleep(0.6)  # the active-version check is at most ACTIVE_CHECK_SECONDS stale
        frames, _text = chat(web_b, QUESTION)
        assert frames[0]["adapter"] == "v2" and frames[-1]["type"] == "done", frames

        time.sleep(2.5)  # one heartbeat
        workers = redis_cache.get(WORKERS_KEY)
        assert len(workers) == 1, workers
        (name, metrics), = workers.items()
        print(f"\nscale-out: 2 web processes, 1 worker ({name}, {metrics['backend']}): "
              f"{metrics['requests_finished']} answers, adapter now {metrics['current_adapter']}")
        assert metrics["requests_finished"] == 3 and metrics["current_adapter"] == "v2"

        # this process as a web process: a cancel reaches the worker and stops the generation there
        client = WorkerEngine(engine_config())
        try:
            request = client.submit(QUESTION, max_new_tokens=256, temperature=1.5, seed=7)  # sampling: no early stop
            deadline = time.monotonic() + 30
            while not request.text and time.monotonic() < deadline:
                time.sleep(0.005)
            request.cancel()
            _text, stats = request.result(timeout=10)
        finally:
            client.close()
        print(f"cancelled through the worker after {stats.tokens} of 256 tokens")
        assert stats.finish_reason == "cancelled" and stats.tokens < 256, stats


def _post(url, body, authorization):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": authorization},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_without_a_worker_a_chat_is_refused_clearly_and_quickly(scaleout_env, training_env, customer):
    token = Token.objects.create(user=customer).key
    web_env = {**scaleout_env, "CSP_INFERENCE_BACKEND": "worker", "CSP_INFERENCE_WAIT_SECONDS": "2"}
    with live_daphne(env=web_env, log=training_env / "web.log") as web:
        started = time.monotonic()
        frames, text = chat(web, QUESTION)
        waited = time.monotonic() - started
        # REST and the OpenAI-compatible endpoint: 503 with a JSON body, not a 500 page
        rest = _post(f"{web}/api/v1/chat/", {"text": QUESTION}, f"Token {token}")
        openai = _post(f"{web}/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": QUESTION}]}, f"Bearer {token}")
    assert rest[0] == 503 and openai[0] == 503, (rest, openai)
    assert openai[1]["error"]["code"] == "model_unavailable"
    print(f"\nno inference worker: refused after {waited:.1f} s")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "unavailable", frames
    assert "inference_worker" in frames[-1]["detail"] and text == ""
    assert waited < 5
