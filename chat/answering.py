"""One answer pipeline for every transport (STYLE.md rule 4).

The websocket (chat.consumers), the REST chat (chat.api_views: JSON or Server-Sent Events) and
the OpenAI-compatible API (chat.openai_views: JSON or Server-Sent Events) ask for an answer the
same way, and only format what they get:

    session = answer_start(engine=ready_engine(), channel=..., text=question, conversation_id=..., user=...)
    session = await answer_astart(channel=..., text=question, ...)   # the same, from an event loop
    async for event in session.events(): ...     # Started, Text..., then Finished or Failed
    for event in session.events_sync(): ...      # the same, for a reader without an event loop

Every answer comes from the curated Q&A (chat.grounding, docs/grounding.md): `answer_start` first
plans the message's mode from the pairs retrieved for it. A curated answer or the fallback reply
streams through the same events without the engine; a grounded one is generated with the retrieved
pairs and passes the fact guard, which may replace it (a `Replaced` event).

`answer_start` checks that the engine has room, stores the question, queues it on the engine and
creates the answer row, all or nothing: a refusal stores nothing. A refusal is a ChatError whose
`code` (AnswerRefused: busy, too_long, unavailable; or not_found for a conversation that is not
the caller's) is all a transport maps to its status or frame.

An AnswerSession stores its answer once, before its last event, however the reader leaves: the
answer ends (Finished); the reader stops reading — it closes the iteration or its task is
cancelled (a client that cancels or goes away) — and the decode is cancelled; or the engine
stops answering (Failed). What was said is kept; an answer stopped early ends "cancelled".

While it streams, the text so far is saved every CSP_ANSWER_SAVE_SECONDS, so a process killed
mid-answer (SIGKILL, out of memory, host lost) loses at most that much of it; the answers such a
process left open are closed "interrupted" by `answers_close_interrupted`, at `manage.py serve`'s
start-up and every minute on the django-q2 schedule "Close interrupted answers".
"""

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from time import monotonic

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models.functions import Coalesce
from django.http import StreamingHttpResponse
from django.utils import timezone
from django.utils.translation import gettext as _

from chat import canary, grounding, services
from chat.models import Conversation, Message
from chat.serving import active_engine
from llm.engine import Done, EngineBusy, EngineError, InputTooLong, Stats, Token

logger = logging.getLogger(__name__)

# How long a stopped answer is waited for before it is stored as it stands: a cancel takes effect
# within one decode step (milliseconds here; a step through the inference worker adds a round trip
# over Redis). The three transports used to wait 2, 5 and 10 s; at 2 s `make stress` found answers
# stored before their cancel took effect (1 in 831), so the middle one.
CANCEL_GRACE_SECONDS = 5
# The engine ends every answer by CSP_CHAT_MAX_SECONDS ("timeout"); one not ended this much later
# means its decode loop is gone, and the reader is told (Failed) instead of waiting forever.
DEADLINE_GRACE_SECONDS = 10
# How long an answer's final write may wait for the database: SQLite waits 20 s for its write lock
# (csplatform.settings), PostgreSQL for a row lock held by a slow transaction.
WRITE_GRACE_SECONDS = 30


# --- refusals ---


class AnswerRefused(services.ChatError):
    """The engine refused the question before it ran; nothing was stored. `code`: busy (with
    `retry_after` seconds), too_long or unavailable (`detail` then names the cause, for the log)."""

    def __init__(self, code, detail, *, retry_after=None):
        super().__init__(code, detail)
        self.retry_after = retry_after


# The one map from what the engine raises to a refusal code, by class. llm.engine.events is giving
# every exception a `code`; with it this becomes `exc.code` — except that EngineClosed's wire code
# is "closed", which the REST API already answers 409 for (a closed conversation): it stays
# "unavailable" here, as it always was.
REFUSAL_CODES = (
    (EngineBusy, "busy"),
    (InputTooLong, "too_long"),
    (EngineError, "unavailable"),  # closed, a backend or remote side that cannot serve
    (OSError, "unavailable"),  # the base model's or an adapter's files are missing (BaseModelError is one)
    (ValueError, "unavailable"),  # a pinned version the engine holds from another path
)
REFUSED = tuple(kind for kind, _code in REFUSAL_CODES)


def refusal(exc):
    """The AnswerRefused for one of the engine's exceptions (one of REFUSED)."""
    code = next(code for kind, code in REFUSAL_CODES if isinstance(exc, kind))
    if code == "busy":
        return AnswerRefused(code, busy_detail(exc.retry_after), retry_after=exc.retry_after)
    return AnswerRefused(code, str(exc))


def busy_detail(retry_after):
    return _("The assistant is busy; retry in %(seconds)s s.") % {"seconds": retry_after}


def unavailable_detail():
    """What an HTTP client is told when the model cannot answer (the cause is the operator's: logged)."""
    return _("The assistant is not available: its model cannot be loaded.")


def stopped_detail():
    return _("The assistant stopped answering; try again later.")


# --- starting an answer ---


def ready_engine():
    """The process's engine on the active version, its model loaded; raises AnswerRefused."""
    try:
        engine = active_engine()
        engine.load()
    except REFUSED as exc:
        raise refusal(exc) from None
    return engine


def plan_for(*, text="", conversation_id=None, session_key="", user=None, turns=None, **options):
    """The grounding Plan for a question as answer_start takes it (chat.grounding.plan_answer)."""
    return grounding.plan_answer(
        text=text, turns=turns, conversation_id=conversation_id, session_key=session_key, user=user, options=options
    )


async def answer_astart(**question):
    """`answer_start` from an event loop. The model loads (first answer only, and only when the
    question needs it: curated and fallback answers don't) in a thread of its own, not in the one
    database thread that every websocket consumer of the process shares."""
    submitted = monotonic()
    routed = await sync_to_async(route_for)(**question)
    question = {**question, **routed.pin}
    plan = await sync_to_async(plan_for)(**{k: v for k, v in question.items() if k != "channel"})
    engine = None
    if plan.needs_engine:
        try:
            engine = await sync_to_async(active_engine)()
            await engine.aload()
            plan = await grounding.arerank(plan, engine, question)
        except REFUSED as exc:
            raise refusal(exc) from None
    return await sync_to_async(answer_start)(engine=engine, plan=plan, routed=routed, submitted=submitted, **question)


def route_for(*, conversation_id=None, session_key="", user=None, turns=None, channel=None, text="", **options):
    """The message's chat.canary.Route: the version its conversation is on, and a new one's id and side."""
    conversation_id = None if turns is not None else conversation_id  # a stateless client's turns start a new one
    return canary.route(conversation_id=conversation_id, session_key=session_key, user=user, options=options)


def answer_start(
    *, engine=None, channel, text="", conversation_id=None, session_key="", user=None, turns=None, plan=None, routed=None,
    submitted=None, **options,
):
    """Queue an answer on the (loaded) engine and store its question and answer rows: an AnswerSession.

    `plan` (chat.grounding.Plan, made here when not given) says how: a curated answer or the
    fallback reply needs no engine; a grounded one, or any when grounding is off, goes to `engine`
    (the process's engine, loaded here when None), after the version picked among the retrieved
    pairs where it was trained to (chat.grounding.rerank: the pick may make it curated or fallback).
    `submitted`: monotonic() when the message arrived, when that was before this call.
    `routed` (chat.canary.Route, made here when not given; `plan` was made with its pin) keeps the
    conversation on the version it started with while a canary runs, and gives a new one its id.

    The question is either `text`, the next message of the caller's conversation `conversation_id`
    (a new one when empty), its history read back from the database; or `turns`, the whole
    conversation of a stateless client (the OpenAI API), stored as a new conversation. `options`
    go to `engine.submit` (max_new_tokens, temperature, top_p, seed, system, adapter, adapter_path).

    Raises AnswerRefused or ChatError("not_found"), having stored nothing: room is checked before
    any database work (so a busy engine refuses cheaply; the REST chat used not to check, and
    stored and rolled back the question), and the rows are written in one transaction with the
    submit, so a client that retries after a refusal leaves no duplicate question behind.
    """
    submitted = monotonic() if submitted is None else submitted
    session = AnswerSession()
    try:
        if routed is None:
            routed = route_for(conversation_id=conversation_id, session_key=session_key, user=user, turns=turns, **options)
            options = {**options, **routed.pin}
        if plan is None:
            plan = plan_for(text=text, conversation_id=conversation_id, session_key=session_key, user=user, turns=turns, **options)
        if plan.needs_engine:
            engine = engine if engine is not None else ready_engine()
            engine.check_room()
            plan = grounding.rerank(plan, engine, options)  # done already when answer_astart reranked
        session.plan = plan

        def submit(history):
            if not plan.needs_engine:
                name = plan.version.name if plan.version is not None else None
                return grounding.CannedRequest(plan.reply(), adapter=name, on_event=session.on_event, submitted=submitted)
            if plan.decision is None:  # grounding is off
                return engine.submit(history, on_event=session.on_event, **options)
            session.shaper = grounding.GuardedStream(plan, on_event=session.on_event)
            request = engine.submit(plan.prompt_turns(history), on_event=session.shaper, **options)
            session.shaper.attach(request)
            return request

        with transaction.atomic():
            if turns is None:
                conversation = services.conversation_for(
                    conversation_id=conversation_id, session_key=session_key, user=user, channel=channel,
                    new_id=routed.new_id, rollout=routed.rollout,
                )
                history, _question = services.message_add_question(conversation=conversation, text=text)
                session.request = submit(history)
            else:
                # Submitted before the first write: a pinned version that is not loaded yet loads
                # without holding the database's write lock (SQLite takes it at the first write).
                session.request = submit(turns)
                conversation = services.conversation_record(
                    turns=turns, user=user, channel=channel, new_id=routed.new_id, rollout=routed.rollout
                )
            session.conversation = conversation
            session.answer = services.message_start_answer(
                conversation=conversation, adapter_name=session.request.adapter, mode=plan.mode, sources=plan.sources
            )
            if routed.new_id is not None:
                services.conversation_started_on(conversation=conversation, version=session.answer.adapter_version)
        if isinstance(session.request, grounding.CannedRequest):
            session.request.start()
    except BaseException as exc:
        if session.request is not None:
            session.request.cancel()
        if isinstance(exc, REFUSED):
            raise refusal(exc) from None
        raise
    return session


# --- the events a reader gets ---


@dataclass(frozen=True)
class Started:
    conversation: Conversation
    answer: Message  # the answer row: its pk is the message id clients rate
    adapter: str | None  # the version that answers; None: the base model


@dataclass(frozen=True)
class Text:
    text: str  # the next piece of the answer


@dataclass(frozen=True)
class Replaced:
    """The fact guard stopped a generated answer: what was shown of it is to be replaced by `text`
    (the best curated answer, or the fallback reply)."""

    text: str


@dataclass(frozen=True)
class Finished:
    answer: Message  # stored
    text: str  # as generated (the stored text drops NUL characters)
    stats: Stats  # finish_reason: stop, length, timeout, error, filtered, cancelled, corrected or fallback
    mode: str = ""  # curated, grounded or fallback ("" with grounding off)
    sources: list = dataclasses.field(default_factory=list)  # [{"pair", "rank", "score"}], retrieved
    used: list = dataclasses.field(default_factory=list)  # ids of the pairs the answer drew on


@dataclass(frozen=True)
class Failed:
    """The engine stopped answering: no end by CSP_CHAT_MAX_SECONDS and a grace. The answer was
    stored as far as it got, "cancelled"."""

    answer: Message
    text: str
    stats: Stats  # as far as it got: no finish reason
    mode: str = ""
    sources: list = dataclasses.field(default_factory=list)
    used: list = dataclasses.field(default_factory=list)
    code: str = "unavailable"


class AnswerSession:
    """One answer being generated, made by `answer_start`: read its events once, with `events()`
    on an event loop or `events_sync()` without one."""

    def __init__(self):
        self.conversation = self.answer = self.request = None  # set by answer_start
        self.plan = None  # chat.grounding.Plan, set by answer_start
        self.shaper = None  # chat.grounding.GuardedStream of a grounded answer
        # The engine's Token/Done events, handed over from its decode thread by on_event.
        self._pending = collections.deque()
        self._lock = threading.Lock()
        self._waker = None  # (loop, asyncio.Event) of the reader
        self._end = None  # the engine's Done, once it arrived
        self._stored = False
        self._stop_waited = False
        self._written_by_sync_reader = False  # events_sync writes the answer, not events()
        self._streamed = []  # the pieces of text handed to the reader so far
        self._saved_at = None  # monotonic() of the last save of the text so far (or of the start)

    def on_event(self, event):
        """Called by the engine on its decode thread: keep it short."""
        with self._lock:
            self._pending.append(event)
            waker = self._waker
        if waker is not None:
            loop, flag = waker
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that loop is closed: nobody reads this answer any more
                self.request.cancel()

    async def _next(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._pending:
                    return self._pending.popleft()
                if self._waker is None or self._waker[0] is not loop:
                    self._waker = (loop, asyncio.Event())
                flag = self._waker[1]
                flag.clear()  # under the lock: an event appended after this sets it again
            await flag.wait()

    async def events(self):
        """Started, a Text per piece of the answer, then Finished or Failed, the answer stored before it."""
        try:
            self._saved_at = monotonic()
            yield Started(conversation=self.conversation, answer=self.answer, adapter=self.request.adapter)
            deadline = asyncio.get_running_loop().time() + settings.CSP_CHAT_MAX_SECONDS + DEADLINE_GRACE_SECONDS
            while self._end is None:
                try:
                    # The deadline covers the waits only, never a yield (it would cancel the sender).
                    async with asyncio.timeout_at(deadline):
                        event = await self._next()
                except TimeoutError:
                    break
                if isinstance(event, (Token, grounding.Replace)):
                    if isinstance(event, Token):
                        self._streamed.append(event.text)
                        yield Text(event.text)
                    else:
                        self._streamed[:] = [event.text]
                        yield Replaced(event.text)
                    # After the yield: what is saved was handed to the transport. Awaited, not left to
                    # run beside the stream, so it never lands after the final write; the pieces that
                    # arrive meanwhile wait in _pending.
                    if not self._written_by_sync_reader and self._save_due():
                        await sync_to_async(self._save_progress)()
                elif isinstance(event, Done):
                    self._end = event
            await self._store()
            yield self._last_event()
        finally:
            await self._store()  # the reader left: stop the decode, keep what was said

    async def result(self):
        """Read the answer to its end: Finished or Failed."""
        async for event in self.events():
            last = event
        return last

    def events_sync(self):
        """`events()` for a reader without an event loop (a WSGI response, a sync view waiting for
        the whole answer), read on a loop of its own in the calling thread. The ORM may not be
        called on a running loop, so the answer is written here, between the loop's steps: in the
        calling thread, on its database connection (the request's; in tests, the test's transaction)."""
        loop = asyncio.new_event_loop()
        self._written_by_sync_reader = True
        events = self.events()
        try:
            while True:
                try:
                    event = loop.run_until_complete(anext(events))
                except StopAsyncIteration:
                    return
                if isinstance(event, (Finished, Failed)):
                    self._write()
                yield event
                if isinstance(event, (Text, Replaced)) and self._save_due():
                    self._save_progress()
        finally:
            loop.run_until_complete(events.aclose())  # a reader that left: the decode is stopped, waited for
            self._write()
            loop.close()

    async def stop(self):
        """Stop the answer and store it as it stands, unless its reader did already."""
        await self._store()

    def result_sync(self):
        for event in self.events_sync():
            last = event
        return last

    async def _store(self):
        """Store the answer as it ended; one still running is cancelled and waited for first."""
        if self._stored:
            return
        if self._end is None and not self._stop_waited:
            self._stop_waited = True  # once: a reader that leaves after the deadline does not wait again
            self.request.cancel()  # stops the decode within a step
            try:
                async with asyncio.timeout(CANCEL_GRACE_SECONDS):
                    while self._end is None:
                        if isinstance(event := await self._next(), Done):
                            self._end = event
            except TimeoutError:
                pass  # written without an end: message_finish_answer marks it cancelled
        if not self._written_by_sync_reader:
            await sync_to_async(self._write)()

    def _save_due(self):
        """Whether the text so far is due to be saved (once per CSP_ANSWER_SAVE_SECONDS: by elapsed
        time, not per piece, so a fast model costs no more writes than a slow one)."""
        if monotonic() - self._saved_at < settings.CSP_ANSWER_SAVE_SECONDS:
            return False
        self._saved_at = monotonic()
        return True

    def _save_progress(self):
        """One UPDATE of the answer's text so far, its pieces counted as its tokens (each piece is one
        decode step's text; the engine's own count comes with the end), and the heartbeat. Only
        while the answer is open: it never rewrites one that has ended."""
        if self._stored:
            return
        Message.objects.filter(pk=self.answer.pk, finish_reason="").update(
            # NUL: see services.message_finish_answer (PostgreSQL refuses it in text).
            text="".join(self._streamed).replace("\x00", ""), tokens=len(self._streamed), saved_at=timezone.now()
        )

    @property
    def text(self):
        """The answer as the customer sees it: the engine's text unless the fact guard shaped it."""
        return self.shaper.text if self.shaper is not None else self.request.text

    @property
    def mode(self):
        if self.shaper is not None:
            return self.shaper.mode
        return self.plan.mode if self.plan is not None else ""

    def _grounding(self):
        """mode, sources, used: what Finished/Failed carry and the answer row stores."""
        if self.plan is None or self.plan.decision is None:
            return {"mode": "", "sources": [], "used": []}
        used = self.plan.used(self.text)
        if self.shaper is not None and self.shaper.outcome is not None:
            used = [self.plan.decision.best.pair_id] if self.mode == "curated" else []
        return {"mode": self.mode, "sources": self.plan.sources, "used": used}

    def _write(self):
        if self._stored:
            return
        stats = self._end.stats if self._end is not None else self.request.stats
        services.message_finish_answer(answer=self.answer, text=self.text, stats=stats, **self._grounding())
        self._stored = True

    def _last_event(self):
        if self._end is None:
            logger.error("chat request %s never finished; the engine is not decoding", self.request.id)
            return Failed(answer=self.answer, text=self.text, stats=self.request.stats, **self._grounding())
        return Finished(answer=self.answer, text=self.text, stats=self._end.stats, **self._grounding())


# --- answers left open by a process that died ---


def interrupted_after():
    """Seconds without a save after which an open answer has no live process streaming it.

    A live process ends each of its answers, at the latest, CSP_CHAT_MAX_SECONDS (the engine's
    limit) + DEADLINE_GRACE_SECONDS (the reader's deadline) + CANCEL_GRACE_SECONDS (the wait for a
    cancel) after it starts, and its final write may wait WRITE_GRACE_SECONDS for the database. An
    answer's last save is never earlier than its start, and one that streams saves every
    CSP_ANSWER_SAVE_SECONDS; a few intervals more absorb a save that waited for the database and
    clock skew between hosts. So an answer open and unsaved for longer was left by a dead process,
    whichever of several web processes sharing the database looks (111 s with the defaults),
    and an answer another live daphne is streaming is never closed under it.
    """
    return (
        settings.CSP_CHAT_MAX_SECONDS + DEADLINE_GRACE_SECONDS + CANCEL_GRACE_SECONDS + WRITE_GRACE_SECONDS
        + 3 * settings.CSP_ANSWER_SAVE_SECONDS
    )


def answers_close_interrupted(*, now=None):
    """Close as "interrupted" the answers a dead process left open (see `interrupted_after`), with the
    text and token count of their last save; returns how many. Run at `manage.py serve`'s start-up
    and by the django-q2 schedule "Close interrupted answers" (chat migration 0007)."""
    cutoff = (now or timezone.now()) - timedelta(seconds=interrupted_after())
    closed = Message.objects.filter(role=Message.Role.ASSISTANT, finish_reason="", saved_at__lt=cutoff).update(
        finish_reason=Message.FinishReason.INTERRUPTED, tokens=Coalesce("tokens", 0)
    )
    if closed:
        logger.warning("%d answer(s) left open by a stopped web process were closed as interrupted", closed)
    return closed


# --- Server-Sent Events, for the two HTTP transports ---


def sse(data, *, event=None):
    """One Server-Sent Event: JSON `data` (a str is sent as it is: OpenAI's "[DONE]"), named or not."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)  # one line: newlines are escaped
    return f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n"


def sse_response(session, render, *, asgi):
    """The session's events as a text/event-stream response: `render(event)` gives each event's
    frames (strings made by `sse`), each sent on as soon as it is made.

    Which kind of iterator the response gets matters: under ASGI (daphne) Django sends an async
    iterator's chunks as they come but would first collect a sync one whole, and the reverse under
    WSGI (the test client, a WSGI server). So it reads `events()` under ASGI, `events_sync()` else.
    """

    async def aframes():
        async with contextlib.aclosing(session.events()) as events:
            async for event in events:
                for frame in render(event):
                    yield frame

    def frames():
        with contextlib.closing(session.events_sync()) as events:
            for event in events:
                yield from render(event)

    # The events are UTF-8 JSON; without a charset a client may decode them as Latin-1 (mojibake).
    response = StreamingHttpResponse(aframes() if asgi else frames(), content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response
