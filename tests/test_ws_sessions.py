"""Session rows: a cookie-less websocket makes one only when it starts a conversation, and expired
sessions are cleared by a daily schedule (issue #16: 30 cookie-less connects made 30 rows)."""

import asyncio
from datetime import timedelta

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.utils import timezone
from django_q.models import Schedule

from chat.models import Conversation
from chat.tests.conftest import backend, serving  # noqa: F401 (fixtures, as tests/test_load.py takes them)
from csplatform.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]
ORIGIN = [(b"origin", b"http://localhost")]


async def _connect():
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=ORIGIN)  # no cookie
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def _reply(communicator, frame):
    await communicator.send_json_to(frame)
    return await communicator.receive_json_from(timeout=30)


def test_cookie_less_sockets_that_start_no_conversation_make_no_session_rows():
    async def scenario():
        replies = []
        for index in range(30):
            communicator = await _connect()
            if index % 3 == 1:  # a malformed frame
                await communicator.send_to(text_data="not json")
                replies.append(await communicator.receive_json_from(timeout=10))
            elif index % 3 == 2:  # frames about conversations or answers it does not have
                replies.append(await _reply(communicator, {"type": "join", "conversation": "00000000-0000-0000-0000-000000000000"}))
                replies.append(await _reply(communicator, {"type": "feedback", "message": 1, "rating": 1}))
            await communicator.disconnect()
        return replies

    replies = asyncio.run(scenario())

    assert len(replies) == 30 and {reply["type"] for reply in replies} == {"error"}
    assert Session.objects.count() == 0


def _answer_frames(frames):
    """(start, text, done) of an answer's frames."""
    return frames[0], "".join(f["text"] for f in frames if f["type"] == "token"), frames[-1]


async def _ask(communicator, text, conversation=None):
    await communicator.send_json_to({"type": "message", "text": text, "conversation": conversation})
    frames = [await communicator.receive_json_from(timeout=30)]
    assert frames[0]["type"] == "start", frames
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(await communicator.receive_json_from(timeout=30))
    return _answer_frames(frames)


def test_a_cookie_less_customer_owns_the_conversation_it_starts_for_the_socket(serving, faq):  # noqa: F811
    async def scenario():
        customer = await _connect()
        start, text, done = await _ask(customer, faq[0]["instruction"])
        second, _, _ = await _ask(customer, faq[1]["instruction"], start["conversation"])
        rated = await _reply(customer, {"type": "feedback", "message": done["message"], "rating": 1})
        joined = await _reply(customer, {"type": "join", "conversation": start["conversation"]})
        stranger = await _connect()
        refused = await _reply(stranger, {"type": "join", "conversation": start["conversation"]})
        await stranger.disconnect()
        await customer.disconnect()
        return start, text, second, rated, joined, refused

    start, text, second, rated, joined, refused = asyncio.run(scenario())

    assert text == faq[0]["output"] and second["conversation"] == start["conversation"]
    assert rated["type"] == "feedback" and joined == {"type": "handoff", "state": "bot", "conversation": start["conversation"]}
    assert refused["type"] == "error" and refused["code"] == "not_found"
    session = Session.objects.get()  # the customer's: none for the stranger
    assert Conversation.objects.get().session_key == session.session_key


def test_a_cookie_less_customer_asking_for_a_person_owns_the_conversation_it_starts():
    async def scenario():
        customer = await _connect()
        received = await _reply(customer, {"type": "message", "text": "转人工"})
        await customer.receive_json_from(timeout=10)  # the handoff state that follows
        joined = await _reply(customer, {"type": "join", "conversation": received["conversation"]})
        await customer.disconnect()
        return received, joined

    received, joined = asyncio.run(scenario())

    assert received["type"] == "received" and joined["state"] == "waiting"
    assert Conversation.objects.get().session_key == Session.objects.get().session_key


def test_expired_sessions_are_cleared_by_a_daily_schedule(q2_sync):
    # The migration's row, made afresh: an earlier transactional test may have flushed it.
    call_command("migrate", "csplatform", "zero", verbosity=0)
    call_command("migrate", "csplatform", verbosity=0)
    expired, live = SessionStore(), SessionStore()
    expired.set_expiry(-60)
    for session in (expired, live):
        session.create()
    schedule = Schedule.objects.get(name="Clear expired sessions")
    assert schedule.schedule_type == Schedule.DAILY and schedule.repeats == -1
    # Only this schedule is due: the scheduler runs it (in this process) as a cluster would.
    Schedule.objects.exclude(pk=schedule.pk).update(next_run=timezone.now() + timedelta(days=1))
    Schedule.objects.filter(pk=schedule.pk).update(next_run=timezone.now() - timedelta(minutes=1))
    from django_q.scheduler import scheduler

    scheduler()

    assert list(Session.objects.values_list("session_key", flat=True)) == [live.session_key]
    assert Schedule.objects.get(pk=schedule.pk).next_run > timezone.now() + timedelta(hours=23)
