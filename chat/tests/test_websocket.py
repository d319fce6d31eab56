"""The chat websocket through the real ASGI application (origin check, sessions, consumer)."""

import asyncio
import json

import pytest
from channels.testing import WebsocketCommunicator

from chat.consumers import CLOSE_POLICY_VIOLATION, CLOSE_TOO_BIG
from chat.models import Conversation, Message
from csplatform.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]
ORIGIN = [(b"origin", b"http://localhost")]


async def _connect(headers=ORIGIN):
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def _answer(communicator, text, conversation=None):
    await communicator.send_json_to({"type": "message", "text": text, "conversation": conversation})
    start = await communicator.receive_json_from(timeout=30)
    assert start["type"] == "start", start
    tokens = []
    while True:
        frame = await communicator.receive_json_from(timeout=30)
        if frame["type"] == "token":
            tokens.append(frame["text"])
        else:
            return start, "".join(tokens), frame


def test_a_question_streams_the_trained_answer_and_is_stored(serving, faq):
    async def scenario():
        communicator = await _connect()
        start, text, done = await _answer(communicator, faq[0]["instruction"])
        await communicator.disconnect()
        return start, text, done

    start, text, done = asyncio.run(scenario())
    assert start["adapter"] == "v1" and text == faq[0]["output"]
    assert done["type"] == "done" and done["tokens"] > 0 and done["latency_ms"] >= done["first_token_ms"] > 0
    answer = Message.objects.get(pk=done["message"])
    assert answer.text == faq[0]["output"] and answer.adapter_version == serving and answer.latency_ms == done["latency_ms"]
    assert answer.conversation_id.hex == start["conversation"].replace("-", "")


def test_second_turn_continues_the_same_conversation(serving, faq):
    async def scenario():
        communicator = await _connect()
        start, _, _ = await _answer(communicator, faq[0]["instruction"])
        start2, text2, _ = await _answer(communicator, faq[1]["instruction"], start["conversation"])
        await communicator.disconnect()
        return start, start2

    first, second = asyncio.run(scenario())
    assert first["conversation"] == second["conversation"]
    assert Message.objects.filter(conversation_id=first["conversation"]).count() == 4


def test_feedback_is_stored_on_the_answer(serving, faq):
    async def scenario():
        communicator = await _connect()
        _, _, done = await _answer(communicator, faq[0]["instruction"])
        await communicator.send_json_to({"type": "feedback", "message": done["message"], "rating": -1, "comment": "不对"})
        ack = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return done, ack

    done, ack = asyncio.run(scenario())
    assert ack == {"type": "feedback", "message": done["message"], "rating": -1}
    answer = Message.objects.get(pk=done["message"])
    assert answer.rating == -1 and answer.feedback_comment == "不对"


@pytest.mark.parametrize(
    "raw, code",
    [("not json", "invalid"), ("[1, 2]", "invalid"), ('{"type": "dance"}', "invalid"), ('{"type": "message", "text": ""}', "invalid"),
     ('{"type": "message", "text": "a\\u0000b"}', "invalid"),
     ('{"type": "message", "text": "' + "问" * 3000 + '"}', "too_long"), ('{"type": "feedback", "message": 99999, "rating": 1}', "not_found"),
     ('{"type": "message", "text": "hi", "conversation": "00000000-0000-0000-0000-000000000000"}', "not_found")],
)
def test_malformed_frames_get_an_error_frame_and_the_socket_stays_open(serving, raw, code):
    async def scenario():
        communicator = await _connect()
        await communicator.send_to(text_data=raw)
        frame = await communicator.receive_json_from(timeout=10)
        await communicator.send_to(text_data="still there?")
        again = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return frame, again

    frame, again = asyncio.run(scenario())
    assert frame["type"] == "error" and frame["code"] == code
    assert again["type"] == "error"


def test_another_sessions_conversation_cannot_be_continued(serving, faq):
    async def scenario():
        owner = await _connect()
        start, _, _ = await _answer(owner, faq[0]["instruction"])
        await owner.disconnect()
        stranger = await _connect()
        await stranger.send_json_to({"type": "message", "text": "我的订单呢？", "conversation": start["conversation"]})
        frame = await stranger.receive_json_from(timeout=10)
        await stranger.disconnect()
        return frame

    assert asyncio.run(scenario())["code"] == "not_found"


def test_foreign_origin_is_refused(serving):
    async def scenario():
        communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://evil.example")])
        connected, _ = await communicator.connect()
        # End the application as a server would (the client is gone): on channels-redis a consumer
        # left waiting on its channel does not end when asyncio.run cancels it, and the run hangs.
        await communicator.disconnect()
        return connected

    assert asyncio.run(scenario()) is False


def test_cancel_stops_the_answer_and_keeps_the_partial_text(serving, faq, settings, held_after_the_first_token):
    async def scenario():
        communicator = await _connect()
        await communicator.send_json_to({"type": "message", "text": faq[2]["instruction"]})
        start = await communicator.receive_json_from(timeout=30)
        await communicator.receive_json_from(timeout=30)  # the first token
        await communicator.send_json_to({"type": "cancel"})
        frame = await communicator.receive_json_from(timeout=10)
        while frame["type"] == "token":  # tokens already on their way before the cancel
            frame = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return start, frame

    start, done = asyncio.run(scenario())
    assert done["type"] == "done" and done["finish_reason"] == "cancelled" and done["message"] == start["message"]
    answer = Message.objects.get(pk=start["message"])
    assert answer.finish_reason == "cancelled" and len(answer.text) < len(faq[2]["output"])


def test_flooding_client_is_told_then_closed(serving, settings):
    settings.CSP_CHAT_FRAMES_PER_10S = 3

    async def scenario():
        communicator = await _connect()
        for _ in range(3):
            await communicator.send_to(text_data="{}")
            await communicator.receive_json_from(timeout=5)
        await communicator.send_to(text_data="{}")
        limited = await communicator.receive_json_from(timeout=5)
        for _ in range(3):
            await communicator.send_to(text_data="{}")
        closed = await communicator.receive_output(timeout=5)
        while closed["type"] != "websocket.close":
            closed = await communicator.receive_output(timeout=5)
        await communicator.disconnect()
        return limited, closed

    limited, closed = asyncio.run(scenario())
    assert limited["code"] == "rate_limited" and closed["code"] == CLOSE_POLICY_VIOLATION


def test_a_huge_frame_closes_the_socket_and_a_long_message_gets_an_error(serving, settings):
    async def scenario():
        communicator = await _connect()
        await communicator.send_to(text_data=json.dumps({"type": "message", "text": "问" * 2100}))
        long_message = await communicator.receive_json_from(timeout=5)
        await communicator.send_to(text_data="x" * (2 * 1024 * 1024))  # 2 MiB
        closed = await communicator.receive_output(timeout=5)
        await communicator.disconnect()
        return long_message, closed

    long_message, closed = asyncio.run(scenario())
    assert long_message["type"] == "error" and long_message["code"] == "too_long"
    assert closed == {"type": "websocket.close", "code": CLOSE_TOO_BIG}


def test_conversations_are_owned_by_the_browser_session(serving, faq):
    async def scenario():
        communicator = await _connect()
        await _answer(communicator, faq[0]["instruction"])
        await communicator.disconnect()

    asyncio.run(scenario())
    conversation = Conversation.objects.get()
    assert conversation.session_key and conversation.channel == "web" and conversation.title == faq[0]["instruction"]


def test_busy_engine_answers_busy_and_stores_nothing(serving, faq, settings):
    import threading

    from chat.serving import active_engine, reset_engine

    settings.CSP_CHAT_MAX_ACTIVE, settings.CSP_CHAT_MAX_WAITING = 1, 0
    reset_engine()  # the limits are read when the engine is made
    release = threading.Event()
    try:
        engine = active_engine()
        held = engine.submit("占位问题", on_event=lambda event: release.wait(10))  # holds the only slot

        async def scenario():
            communicator = await _connect()
            await communicator.send_json_to({"type": "message", "text": faq[0]["instruction"]})
            frame = await communicator.receive_json_from(timeout=10)
            await communicator.disconnect()
            return frame

        frame = asyncio.run(scenario())
    finally:
        release.set()
        held.cancel()
        reset_engine()
    assert frame["type"] == "busy" and frame["retry_after"] >= 1
    assert not Conversation.objects.exists() and not Message.objects.exists()


def test_disconnect_mid_stream_stops_the_generation(serving, faq, held_after_the_first_token):
    async def scenario():
        communicator = await _connect()
        await communicator.send_json_to({"type": "message", "text": faq[3]["instruction"]})
        start = await communicator.receive_json_from(timeout=30)
        await communicator.receive_json_from(timeout=30)  # the first token
        await communicator.disconnect()
        return start

    start = asyncio.run(scenario())
    answer = Message.objects.get(pk=start["message"])
    assert held_after_the_first_token and answer.finish_reason == "cancelled" and answer.tokens < len(faq[3]["output"])


def test_multi_turn_history_reaches_the_model(serving, faq, monkeypatch):
    from chat.serving import active_engine

    engine = active_engine()
    seen = []
    real_submit = engine.submit

    def recording_submit(history, **options):  # records what the real engine is asked, then asks it
        seen.append([(turn.role, turn.text) for turn in history])
        return real_submit(history, **options)

    monkeypatch.setattr(engine, "submit", recording_submit)

    async def scenario():
        communicator = await _connect()
        start, _, _ = await _answer(communicator, faq[0]["instruction"])
        await _answer(communicator, faq[1]["instruction"], start["conversation"])
        await communicator.disconnect()

    asyncio.run(scenario())
    assert seen[1] == [("user", faq[0]["instruction"]), ("assistant", faq[0]["output"]), ("user", faq[1]["instruction"])]


def test_activation_during_streaming_finishes_on_the_old_version(serving, faq, second_adapter):
    from channels.db import database_sync_to_async

    from training.models import AdapterVersion
    from training.services import adapter_version_activate

    v2 = AdapterVersion.objects.create(
        name="v2", run=serving.run.__class__.objects.create(base_model=serving.base_model, snapshot=serving.run.snapshot, status="succeeded"),
        base_model=serving.base_model, path=str(second_adapter),
    )

    async def scenario():
        communicator = await _connect()
        await communicator.send_json_to({"type": "message", "text": faq[0]["instruction"]})
        start = await communicator.receive_json_from(timeout=30)
        await database_sync_to_async(adapter_version_activate)(version=v2)  # while v1 streams
        tokens, frame = [], await communicator.receive_json_from(timeout=30)
        while frame["type"] == "token":
            tokens.append(frame["text"])
            frame = await communicator.receive_json_from(timeout=30)
        await asyncio.sleep(0.6)  # the active-version check runs at most every 0.5 s
        next_start, _, next_done = await _answer(communicator, faq[0]["instruction"], start["conversation"])
        await communicator.disconnect()
        return start, "".join(tokens), frame, next_start, next_done

    start, text, done, next_start, next_done = asyncio.run(scenario())
    assert start["adapter"] == "v1" and done["adapter"] == "v1" and text == faq[0]["output"]
    assert next_start["adapter"] == "v2" and next_done["adapter"] == "v2"
