"""Handoff across processes: a staff reply made in this process reaches a customer's websocket held
by a daphne subprocess, through channels-redis on the local Redis (the scale-out setting)."""

import json

import pytest
import websocket
from django.contrib.sessions.backends.db import SessionStore

from chat import handoff
from chat.models import Conversation, Message
from tests.support.livetest import live_daphne

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.live, pytest.mark.services]


def _receive(socket):
    return json.loads(socket.recv())


def test_a_staff_reply_crosses_processes_to_the_customers_socket(redis_channel_layer, staff_user, tmp_path):
    session = SessionStore()
    session.create()
    env = {**redis_channel_layer, "CSP_DATA_DIR": str(tmp_path)}
    with live_daphne(env=env, log=tmp_path / "daphne.log") as url:
        host = url.removeprefix("http://")
        socket = websocket.create_connection(
            f"ws://{host}/ws/chat/", origin=url, cookie=f"sessionid={session.session_key}", timeout=20
        )
        try:
            socket.send(json.dumps({"type": "handoff", "conversation": None}))
            waiting = _receive(socket)
            assert waiting["type"] == "handoff" and waiting["state"] == "waiting"
            conversation = Conversation.objects.get(pk=waiting["conversation"])
            assert conversation.session_key == session.session_key

            reply = handoff.handoff_reply(conversation=conversation, agent=staff_user, text="跨进程的回复")
            assert _receive(socket) == {"type": "handoff", "state": "agent"}
            assert _receive(socket) == {"type": "agent", "text": "跨进程的回复", "message": reply.pk}

            handoff.handoff_close(conversation=conversation, agent=staff_user)
            assert _receive(socket) == {"type": "handoff", "state": "closed"}
        finally:
            socket.close()
    assert list(Message.objects.filter(conversation=conversation).values_list("role", "text")) == [("agent", "跨进程的回复")]


def test_a_socket_idle_longer_than_the_redis_read_timeout_still_gets_the_reply(redis_channel_layer, staff_user, tmp_path):
    """channels-redis blocks 5 s per receive and redis-py 8 stops reading after 5 s by default:
    without a longer read timeout (settings.channel_layer_host) an idle consumer dies."""
    import time

    session = SessionStore()
    session.create()
    env = {**redis_channel_layer, "CSP_DATA_DIR": str(tmp_path)}
    with live_daphne(env=env, log=tmp_path / "daphne.log") as url:
        socket = websocket.create_connection(
            f"ws://{url.removeprefix('http://')}/ws/chat/", origin=url, cookie=f"sessionid={session.session_key}", timeout=20
        )
        try:
            socket.send(json.dumps({"type": "handoff", "conversation": None}))
            conversation = Conversation.objects.get(pk=_receive(socket)["conversation"])
            time.sleep(12)  # two of channels-redis's 5 s blocking reads, with nothing to read
            handoff.handoff_reply(conversation=conversation, agent=staff_user, text="still here")
            assert _receive(socket) == {"type": "handoff", "state": "agent"}
            assert _receive(socket)["text"] == "still here"
        finally:
            socket.close()
    assert "TimeoutError" not in (tmp_path / "daphne.log").read_text()
