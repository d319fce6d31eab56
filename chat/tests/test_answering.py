"""The answer pipeline every transport shares (chat.answering): how an answer starts, is read and
is stored however its reader leaves. The transports' own tests (test_websocket, test_chat_api,
test_openai) drive it through their frames; these pin what they cannot see from outside."""

import json
import threading
import time

import pytest

from chat import answering
from chat.answering import AnswerSession, Failed, Finished, Started, Text, answer_start, ready_engine
from chat.models import Conversation, Message
from llm.engine import EngineBusy, EngineClosed, EngineError, InputTooLong, Token

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "exc, code",
    [
        (EngineBusy(retry_after=3), "busy"),
        (InputTooLong("2000 tokens; the limit is 1024", limit=1024, size=2000, unit="tokens"), "too_long"),
        (EngineClosed("the engine is closed"), "unavailable"),  # never "closed": that is a closed conversation
        (EngineError("the inference worker does not answer"), "unavailable"),
        (FileNotFoundError("/models/gemma"), "unavailable"),
        (ValueError("adapter 'v2' is already loaded from '/elsewhere'"), "unavailable"),
    ],
)
def test_each_engine_refusal_becomes_one_code(exc, code):
    refused = answering.refusal(exc)

    assert refused.code == code
    if code == "busy":
        assert refused.retry_after == 3 and "3" in refused.detail
    else:
        assert refused.detail == str(exc)  # the cause, for the log (HTTP clients get a generic text)


def test_a_server_sent_event_is_one_line_of_json_named_or_not():
    named = answering.sse({"text": "第一行\n第二行"}, event="token")

    assert named == 'event: token\ndata: {"text": "第一行\\n第二行"}\n\n'
    assert json.loads(named.split("data: ", 1)[1]) == {"text": "第一行\n第二行"}
    assert answering.sse("[DONE]") == "data: [DONE]\n\n"


def test_a_question_is_started_read_to_its_end_and_stored(serving, faq, customer):
    session = answer_start(engine=ready_engine(), channel=Conversation.Channel.API, text=faq[0]["instruction"], user=customer)

    events = list(session.events_sync())

    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert {type(event) for event in events[1:-1]} == {Text}
    assert "".join(event.text for event in events[1:-1]) == events[-1].text == faq[0]["output"]
    answer = Message.objects.get(pk=events[0].answer.pk)
    assert answer.text == faq[0]["output"] and answer.finish_reason == "stop" and answer.adapter_name == "v1"
    assert [m.role for m in answer.conversation.messages.order_by("created_at", "pk")] == ["user", "assistant"]


def _held_after_each_token(monkeypatch, until):
    """The decode thread waits in the session's callback after each piece of text until `until(session)`
    (or 10 s), so an answer cannot run on past what its reader has seen."""
    deliver = AnswerSession.on_event

    def held(session, event):
        deliver(session, event)
        deadline = time.monotonic() + 10
        while isinstance(event, Token) and not until(session) and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(AnswerSession, "on_event", held)


def test_a_reader_without_an_event_loop_that_stops_reading_cancels_the_answer_and_keeps_what_it_read(
    serving, faq, customer, monkeypatch
):
    _held_after_each_token(monkeypatch, until=lambda session: session.request.cancelled)
    session = answer_start(engine=ready_engine(), channel=Conversation.Channel.API, text=faq[0]["instruction"], user=customer)

    events = session.events_sync()
    started, first = next(events), next(events)
    events.close()  # a WSGI client that hung up

    answer = Message.objects.get(pk=started.answer.pk)
    assert isinstance(first, Text) and answer.finish_reason == "cancelled" and answer.text == first.text
    assert faq[0]["output"].startswith(answer.text) and answer.text != faq[0]["output"]


def test_an_answer_the_engine_never_ends_fails_and_is_kept_as_far_as_it_got(serving, faq, customer, monkeypatch, settings):
    release = threading.Event()
    # The decode thread never comes back from the first piece of text, as if its loop had died.
    _held_after_each_token(monkeypatch, until=lambda session: release.is_set())
    settings.CSP_CHAT_MAX_SECONDS = 0  # the reader's deadline only: the engine keeps its own limits
    monkeypatch.setattr(answering, "DEADLINE_GRACE_SECONDS", 0.3)
    monkeypatch.setattr(answering, "CANCEL_GRACE_SECONDS", 0.3)
    session = answer_start(engine=ready_engine(), channel=Conversation.Channel.API, text=faq[0]["instruction"], user=customer)

    try:
        events = list(session.events_sync())
    finally:
        release.set()

    assert [type(event) for event in events] == [Started, Text, Failed] and events[-1].code == "unavailable"
    answer = Message.objects.get(pk=events[0].answer.pk)
    assert answer.finish_reason == "cancelled" and answer.text == events[1].text


def test_a_refused_question_stores_nothing(serving, faq, customer, monkeypatch):
    engine = ready_engine()

    def full():
        raise EngineBusy(retry_after=2)

    monkeypatch.setattr(engine, "check_room", full)

    with pytest.raises(answering.AnswerRefused) as refused:
        answer_start(engine=engine, channel=Conversation.Channel.API, text=faq[0]["instruction"], user=customer)

    assert refused.value.code == "busy" and refused.value.retry_after == 2
    assert not Conversation.objects.exists() and not Message.objects.exists()
