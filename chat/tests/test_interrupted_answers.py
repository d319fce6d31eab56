"""An answer cut off by a killed web process (issue #16, item 1): its text is saved while it streams,
once per CSP_ANSWER_SAVE_SECONDS, and once no live process can still be streaming it, it is closed
"interrupted" with that text, at `manage.py serve`'s start-up and on the q2 schedule."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta
from http.client import HTTPException
from pydoc import locate
from types import SimpleNamespace

import psutil
import pytest
from django.core.management import call_command
from django.utils import timezone
from django_q.models import Schedule
from rest_framework.authtoken.models import Token as AuthToken

from chat import answering
from chat.answering import AnswerSession, Finished, Text, answer_start, ready_engine
from chat.models import Conversation, Message
from chat.tests.conftest import backend_settings
from csplatform.management.commands import serve
from llm import grounding
from llm.engine import FINISH_REASONS, Token
from tests.support.livetest import live_daphne

pytestmark = pytest.mark.django_db


def test_every_finish_reason_has_a_label_and_interrupted_is_one_of_them():
    assert set(Message.FinishReason.values) == {*FINISH_REASONS, *grounding.FINISH_REASONS, "interrupted"}
    answer = Message(role=Message.Role.ASSISTANT, finish_reason="interrupted")
    assert answer.get_finish_reason_display() == "Interrupted (the server stopped mid-answer)"


def _fake_clock(monkeypatch):
    """The pipeline's monotonic clock, moved by the test (a list of one number)."""
    clock = [0.0]
    monkeypatch.setattr(answering, "monotonic", lambda: clock[0])
    return clock


def test_the_text_so_far_is_saved_once_per_interval_not_per_piece(serving, faq, customer, settings, monkeypatch):
    settings.CSP_ANSWER_SAVE_SECONDS = 1
    clock = _fake_clock(monkeypatch)
    session = answer_start(engine=ready_engine(), channel=Conversation.Channel.API, text=faq[0]["instruction"], user=customer)
    events = session.events_sync()
    started = next(events)

    pieces, rows = [], []
    for event in events:
        if not isinstance(event, Text):
            break
        pieces.append(event.text)
        rows.append(Message.objects.values_list("text", "tokens").get(pk=started.answer.pk))
        clock[0] += 0.25  # a piece every quarter of a second: a save every fourth piece

    # Saved when the reader asks for the piece after the one that completed an interval: the text
    # handed over by then, its pieces counted.
    saved = [(i // 4) * 4 for i in range(len(pieces))]
    assert len(pieces) >= 9  # two saves at least
    assert rows == [("".join(pieces[:n]), n) if n else ("", None) for n in saved]
    answer = Message.objects.get(pk=started.answer.pk)
    assert isinstance(event, Finished) and answer.finish_reason == "stop" and answer.text == faq[0]["output"]
    assert answer.tokens == event.stats.tokens  # the engine's count replaces the pieces counted


def _held_from_the_second_piece(monkeypatch, release):
    """The decode thread waits in the session's callback after the second piece of text until
    `release` is set (or 10 s): the answer stays open, streaming, while the test looks."""
    deliver = AnswerSession.on_event
    pieces = []

    def held(session, event):
        deliver(session, event)
        if isinstance(event, Token):
            pieces.append(event)
            if len(pieces) >= 2:
                release.wait(10)

    monkeypatch.setattr(AnswerSession, "on_event", held)


def test_an_answer_a_live_process_is_streaming_is_never_closed(serving, faq, customer, settings, monkeypatch):
    release = threading.Event()
    _held_from_the_second_piece(monkeypatch, release)
    clock = _fake_clock(monkeypatch)
    session = answer_start(engine=ready_engine(), channel=Conversation.Channel.API, text=faq[0]["instruction"], user=customer)
    events = session.events_sync()
    try:
        started, first = next(events), next(events)
        clock[0] += settings.CSP_ANSWER_SAVE_SECONDS
        second = next(events)  # the first piece is saved before it is fetched
        answer = Message.objects.get(pk=started.answer.pk)

        # Another web process on this database, or this one restarting, closes what it finds open:
        closed_now = answering.answers_close_interrupted()
        closed_at_the_bound = answering.answers_close_interrupted(
            now=answer.saved_at + timedelta(seconds=answering.interrupted_after() - 1)
        )
    finally:
        release.set()
    rest = list(events)

    assert isinstance(second, Text) and answer.text == first.text and answer.finish_reason == ""
    assert closed_now == closed_at_the_bound == 0
    answer.refresh_from_db()
    assert isinstance(rest[-1], Finished) and answer.finish_reason == "stop" and answer.text == faq[0]["output"]


def _conversation():
    return Conversation.objects.create(session_key="s", channel=Conversation.Channel.WEB)


def test_answers_left_open_past_the_bound_are_closed_interrupted_with_their_saved_text():
    conversation = _conversation()
    now = timezone.now()
    long_ago = now - timedelta(seconds=answering.interrupted_after() + 1)
    lately = now - timedelta(seconds=answering.interrupted_after() - 1)
    say = lambda role, **fields: Message.objects.create(conversation=conversation, role=role, **fields)  # noqa: E731
    question = say("user", text="如何退货？", saved_at=long_ago)
    cut_off = say("assistant", text="您好，签收后", tokens=6, saved_at=long_ago)
    never_saved = say("assistant", saved_at=long_ago)
    streaming = say("assistant", text="您好", tokens=2, saved_at=lately)
    finished = say("assistant", text="您好。", tokens=3, finish_reason="stop", saved_at=long_ago)

    closed = answering.answers_close_interrupted(now=now)

    rows = dict(Message.objects.values_list("pk", "finish_reason"))
    assert closed == 2 and rows[cut_off.pk] == rows[never_saved.pk] == "interrupted"
    assert rows[question.pk] == rows[streaming.pk] == "" and rows[finished.pk] == "stop"
    cut_off.refresh_from_db(), never_saved.refresh_from_db()
    assert (cut_off.text, cut_off.tokens) == ("您好，签收后", 6) and (never_saved.text, never_saved.tokens) == ("", 0)


def test_the_q2_schedule_closes_interrupted_answers_every_minute():
    schedule = Schedule.objects.get(name="Close interrupted answers")

    assert locate(schedule.func) is answering.answers_close_interrupted
    assert (schedule.schedule_type, schedule.minutes, schedule.repeats) == (Schedule.MINUTES, 1, -1)


def test_serve_closes_interrupted_answers_at_start_up(monkeypatch, capsys):
    cut_off = Message.objects.create(
        conversation=_conversation(), role="assistant", text="您好", tokens=2,
        saved_at=timezone.now() - timedelta(seconds=answering.interrupted_after() + 1),
    )
    # Each child is a real process that exits at once: serve starts, reconciles, sees a child gone
    # and stops the rest (exit status 1), without a web server or a q2 cluster.
    children = SimpleNamespace(
        Popen=lambda args, **options: subprocess.Popen([sys.executable, "-c", ""], **options),
        TimeoutExpired=subprocess.TimeoutExpired,
    )
    monkeypatch.setattr(serve, "subprocess", children)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit):
            call_command("serve", port=1)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    cut_off.refresh_from_db()
    assert cut_off.finish_reason == "interrupted" and cut_off.text == "您好"
    assert "1 answer(s) cut off by a stopped web process were closed as interrupted." in capsys.readouterr().out


# --- a daphne SIGKILLed mid-answer ---


def _server_sent_events(response):
    """(event, data) of a Server-Sent Events response as they arrive, until the connection ends."""
    name = None
    try:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield name, json.loads(line.removeprefix("data: "))
    except (HTTPException, OSError):  # the server died mid-response
        return


def _daphne_of(url):
    port = url.rsplit(":", 1)[1]
    return next(p for p in psutil.Process().children() if "daphne" in p.cmdline() and port in p.cmdline())


def _poll(condition, timeout, message):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, message
        time.sleep(0.05)
    return value


@pytest.mark.live
@pytest.mark.django_db(transaction=True)
def test_an_answer_cut_off_by_a_killed_daphne_keeps_what_was_streamed_and_is_closed_interrupted(tiny_model, customer, tmp_path):
    # The random tiny model without an adapter never ends on its own: 800 tokens stream for a
    # second or more on transformers (tens of seconds on a slow machine), and the text is saved
    # every 0.2 s: time enough to be killed in the middle after a save.
    env = {
        "CSP_DATA_DIR": str(tmp_path), "CSP_BASE_MODEL": str(tiny_model), **backend_settings("transformers"),
        "CSP_CHAT_MAX_NEW_TOKENS": "800", "CSP_ANSWER_SAVE_SECONDS": "0.2",
        # The random model repeats itself, which prompt-lookup drafts copy many tokens a step:
        # without them the answer streams long enough to be killed in the middle.
        "CSP_DRAFT_TOKENS": "0",
    }
    key = AuthToken.objects.create(user=customer).key
    with live_daphne(env=env, log=tmp_path / "daphne.log") as url:
        request = urllib.request.Request(
            f"{url}/api/v1/chat/?stream=1", data=json.dumps({"text": "如何退货？"}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Token {key}"},
        )
        events = _server_sent_events(urllib.request.urlopen(request, timeout=120))
        name, start = next(events)
        assert name == "start"
        row = _poll(lambda: Message.objects.filter(pk=start["message"]).exclude(text="").first(), 60, "no text was saved")
        assert row.finish_reason == "", "the text was saved only once the answer had ended"
        saved = row.text
        # The customer has been sent what was saved (it is saved once handed over); then the kill.
        pieces = []
        while not "".join(pieces).replace("\x00", "").startswith(saved):
            name, data = next(events)
            assert name == "token", (name, data)
            pieces.append(data["text"])
        os.killpg(_daphne_of(url).pid, signal.SIGKILL)
        rest = list(events)

    assert [name for name, _data in rest if name != "token"] == []  # cut off: no "done", no "error"
    pieces += [data["text"] for _name, data in rest]
    answer = Message.objects.get(pk=start["message"])
    # The row holds the text of its last save, a prefix of what the customer got, and its pieces' count.
    assert answer.finish_reason == "" and answer.text
    assert answer.tokens in {n for n in range(1, len(pieces) + 1) if "".join(pieces[:n]).replace("\x00", "") == answer.text}

    # Young enough to be another live daphne's answer: left open until the bound has passed.
    assert answering.answers_close_interrupted() == 0
    assert answering.answers_close_interrupted(now=answer.saved_at + timedelta(seconds=answering.interrupted_after() + 1)) == 1

    closed = Message.objects.get(pk=answer.pk)
    assert (closed.finish_reason, closed.text, closed.tokens) == ("interrupted", answer.text, answer.tokens)
