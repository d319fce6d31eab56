"""A canary rollout across processes (issue #15): staff start, stop and promote it in one process
(here, the test's), two daphne web processes assign new conversations by it and one inference
worker (`manage.py inference_worker`, reached through channels-redis) serves the pinned version
beside the active one. The rollout lives on the versions' rows, so every process reads the same
one; a conversation keeps its version whichever web process its next message reaches.

The customer is a widget identity (chat.widget's token): it owns its conversations on every web
process without a session cookie, so one conversation can go on from the other process."""

import json
import time
from urllib.parse import quote

import pytest
import websocket

from chat import widget
from chat.models import Conversation
from chat.serving import ACTIVE_CHECK_SECONDS
from chat.tests.conftest import backend_settings
from chat.tests.test_inference_worker import QUESTION, live_worker, redis_cache, scaleout_env  # noqa: F401 (fixtures)
from tests.support.livetest import live_daphne
from training import canary as rollout
from training.tests.factories import make_adapter_version

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.live, pytest.mark.services]


def ask(url, token, conversation=None, timeout=60):
    """One message on a new websocket of the web process at `url`: its "start" frame, once the
    answer is done."""
    host = url.removeprefix("http://")
    socket = websocket.create_connection(f"ws://{host}/ws/chat/?token={quote(token)}", origin=url, timeout=timeout)
    try:
        socket.send(json.dumps({"type": "message", "text": QUESTION, **({"conversation": conversation} if conversation else {})}))
        start = None
        while True:
            frame = json.loads(socket.recv())
            if frame["type"] == "start":
                start = frame
            elif frame["type"] == "done":
                return start
            elif frame["type"] in ("error", "busy"):
                raise AssertionError(frame)
    finally:
        socket.close()


def test_a_canary_set_in_one_process_routes_two_web_processes_and_their_worker(
    scaleout_env, redis_cache, second_adapter, training_env, serving, backend  # noqa: F811 (fixtures imported above)
):
    v1 = serving
    v2 = make_adapter_version("v2", path=second_adapter, beside=v1)
    token = widget.new_widget_token()
    worker_env = {**scaleout_env, **backend_settings(backend)}
    web_env = {**scaleout_env, "CSP_INFERENCE_BACKEND": "worker"}
    with (
        live_worker(env=worker_env, log=training_env / "worker.log"),
        live_daphne(env=web_env, log=training_env / "web-a.log") as web_a,
        live_daphne(env=web_env, log=training_env / "web-b.log") as web_b,
    ):
        rollout.canary_start(version=v2, percent=100)
        on_canary = ask(web_a, token)
        assert on_canary["adapter"] == "v2", on_canary
        conversation = Conversation.objects.get(pk=on_canary["conversation"])
        assert (conversation.rollout, conversation.adapter_version) == ("canary", v2)

        # Stopped here: the conversation stays on v2 on the other web process; a new one gets v1.
        rollout.canary_stop()
        again = ask(web_b, token, conversation=str(conversation.pk))
        assert (again["conversation"], again["adapter"]) == (str(conversation.pk), "v2"), again
        after_stop = ask(web_b, token)
        assert after_stop["adapter"] == "v1", after_stop
        assert Conversation.objects.get(pk=after_stop["conversation"]).rollout == ""

        # Promoted here: new conversations on either process get v2 once their active-version
        # check (at most ACTIVE_CHECK_SECONDS stale) has seen it.
        rollout.canary_start(version=v2, percent=100)
        assert ask(web_b, token)["adapter"] == "v2"
        promoted, _worse = rollout.canary_promote()
        assert promoted == v2 and rollout.current_canary() is None
        deadline = time.monotonic() + ACTIVE_CHECK_SECONDS + 30
        while (start := ask(web_a, token))["adapter"] != "v2":
            assert time.monotonic() < deadline, start
        assert Conversation.objects.get(pk=start["conversation"]).rollout == ""
