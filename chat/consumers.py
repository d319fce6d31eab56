"""The customer chat websocket (/ws/chat/), speaking the protocol in DESIGN.md.

Client → server: {"type": "message", "text", "conversation"}, {"type": "cancel"},
{"type": "feedback", "message", "rating", "comment"}, and for the human handoff
{"type": "handoff", "conversation"} (ask for a person), {"type": "join", "conversation"} (follow a
conversation again after a reconnect: answered with its state) and {"type": "rate",
"conversation", "rating": 1-5} (satisfaction once it is closed).
Server → client: start, token…, done; or error / busy. A generated answer the fact guard stopped
gets {"type": "replace", "text"} (show that instead of the tokens so far) before its done; the done
frame says the answer's mode (curated, grounded, fallback), its retrieved sources and whether a
person is offered (handoff_offered, with the fallback reply, and the curated questions that came
close: suggestions, [{"pair", "question"}]). In a handoff: {"type": "handoff",
"state"} on every state change, {"type": "agent", "text", "message"} for each staff reply, and
{"type": "received", "conversation", "message"} for a message stored for the agent (the
assistant does not answer it). Every malformed frame gets an error frame and the socket stays
open; a client that floods is closed.

Each socket follows one conversation's channel-layer group (chat.handoff.group_name), which is
how staff replies and state changes reach it from any process.

The conversations a socket may open are its session's, or with `?token=` (the widget's frame,
chat/widget.py) that widget identity's; a token that does not verify is refused at connect.

The consumer stays small: it parses, checks limits, calls chat.services, and owns the one
generation task of its connection (cancelled on `cancel` and on disconnect). The answer itself is
chat.answering's, as for the REST chat and the OpenAI-compatible API: the task only turns its
events into frames.
"""

import asyncio
import contextlib
import json
import time
from types import SimpleNamespace
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import translation
from django.utils.translation import gettext as _

from chat import answering, grounding, handoff, services
from chat.models import Conversation
from chat.serving import busy_now
from chat.widget import widget_key
from csplatform.login_throttle import trusted_client
from csplatform.parsers import JSONNestingError, loads_json

# Close codes, in the application range: daphne (autobahn) refuses to send a protocol code such as
# 1008 / 1009 from the application and the consumer would crash instead of closing (a live server
# showed it; the in-process test communicator does not check). 4000 + the RFC 6455 code they mean:
# a client that keeps sending after being told it is too fast (1008 "policy violation"),
CLOSE_POLICY_VIOLATION = 4008
# and a frame far beyond any message (1009 "message too big"; daphne itself sends 1009 past 1 MiB).
CLOSE_TOO_BIG = 4009


# A client address whose socket was closed for flooding may not open another for this long.
# Without it a flooder reconnects and starts a fresh per-socket budget each time: at 1000 frames/s
# that was ~25 sockets/s, each a session and an answer written, and polite customers' first token
# went from 20 ms to tens of seconds behind that database work (tests/test_load.py, issue #6 #11).
FLOOD_COOLDOWN_SECONDS = 10
_cooling_down = {}  # client address -> time.monotonic() when it may connect again (this process)


def _client_address(scope):
    forwarded = dict(scope.get("headers") or []).get(b"x-forwarded-for", b"").decode("latin-1")
    client = scope.get("client")
    # None: unknown (an in-process test), nothing to hold against
    return trusted_client(forwarded, client[0] if client else None)


def _cool_down(scope):
    address, now = _client_address(scope), time.monotonic()
    if address is None:
        return
    if len(_cooling_down) > 10_000:  # bounded: forget the addresses whose time is up
        for expired in [a for a, until in _cooling_down.items() if until <= now]:
            del _cooling_down[expired]
    _cooling_down[address] = now + FLOOD_COOLDOWN_SECONDS


def scope_language(scope):
    """The language the chat page was served in, chosen as LocaleMiddleware chooses it for a request
    (Django's own get_language_from_request): the language cookie, then Accept-Language, then the default.
    The widget's page (chat/widget.py) is served in the language its site chose and names it in
    the socket's query string (?lang=en), which comes first."""
    asked = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("lang", [""])[0]
    if asked in dict(settings.LANGUAGES):
        return asked
    headers = dict(scope.get("headers", ()))
    request = SimpleNamespace(
        COOKIES=scope.get("cookies", {}), META={"HTTP_ACCEPT_LANGUAGE": headers.get(b"accept-language", b"").decode("latin-1")}
    )
    return translation.get_language_from_request(request)


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.generation = None  # the task streaming the answer being generated
        self.session = None  # its chat.answering.AnswerSession
        self.frame_times = []
        self.following = None  # the conversation whose group this socket is in
        self.following_state = None  # its handoff state as last heard (bot, waiting, agent, closed)
        self.language = scope_language(self.scope)
        token = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        # The widget's frame names its identity (chat/widget.py): it owns the socket's conversations
        # in place of the session, which a frame on another site has none of.
        self.widget_key = widget_key(token) if token else None
        if _cooling_down.get(_client_address(self.scope), 0) > time.monotonic():
            await self.close()  # refused before accepting (HTTP 403), and before any database work
            return
        if token and self.widget_key is None:
            await self.close()  # a token this platform did not sign, or expired (or not a widget's): refused
            return
        await self.accept()

    def _ensure_session(self):
        """Give a cookie-less socket a session, which its new conversation is owned by.

        Anonymous customers own their conversations through their session. The chat page gives a
        browser one before it connects; a socket without the cookie gets one here, when its first
        conversation is made, not at connect: that made a session row per connection (30
        connects, 30 rows, issue #16), and the handshake cannot send the cookie back anyway, so
        the session only ever serves this socket.
        """
        session = self.scope.get("session")
        if self.widget_key is None and session is not None and not session.session_key:
            session.save()

    @property
    def session_key(self):
        """Who owns the socket's conversations: the widget's key, or else the browser session's."""
        if self.widget_key is not None:
            return self.widget_key
        session = self.scope.get("session")
        return session.session_key if session is not None else ""

    @property
    def user(self):
        return self.scope.get("user")

    async def disconnect(self, code):
        await self._stop_generation()
        if self.following is not None:
            await self.channel_layer.group_discard(handoff.group_name(self.following), self.channel_name)

    async def _follow(self, conversation_id, state):
        """Join the conversation's group (leaving the previous one): staff replies reach us there."""
        conversation_id = str(conversation_id)
        self.following_state = state
        if self.channel_layer is None or self.following == conversation_id:
            return
        if self.following is not None:
            await self.channel_layer.group_discard(handoff.group_name(self.following), self.channel_name)
        await self.channel_layer.group_add(handoff.group_name(conversation_id), self.channel_name)
        self.following = conversation_id

    # --- from the channel layer (chat.handoff.broadcast) ---

    async def handoff_state(self, event):
        self.following_state = event["state"]
        await self.send_json({"type": "handoff", "state": event["state"]})

    async def handoff_agent(self, event):
        await self.send_json({"type": "agent", "text": event["text"], "message": event["message"]})

    async def send_json(self, data):
        await self.send(text_data=json.dumps(data, ensure_ascii=False))

    async def error(self, code, detail, *, reply_to=None):
        frame = {"type": "error", "code": code, "detail": str(detail)}
        if reply_to:
            frame["reply_to"] = reply_to  # the type of the client frame this answers
        await self.send_json(frame)

    # --- receiving ---

    async def receive(self, text_data=None, bytes_data=None):
        # In the page's language (what LocaleMiddleware chose for it), not the server's default:
        # error texts, the fallback reply. The answer's task, made inside, inherits it.
        with translation.override(self.language):
            await self._receive(text_data, bytes_data)

    async def _receive(self, text_data=None, bytes_data=None):
        if len(text_data or bytes_data or "") > settings.CSP_WS_MAX_FRAME_BYTES:
            # Not a customer who typed too much (that gets an error frame below): drop the socket.
            await self.close(code=CLOSE_TOO_BIG)
            return
        if not await self._within_rate():
            return
        if text_data is None:
            await self.error("invalid", _("Frames must be JSON text."))
            return
        if len(text_data) > settings.CSP_CHAT_MAX_MESSAGE_CHARS * 4 + 1024:
            await self.error("too_long", _("The frame is too large."))
            return
        try:
            frame = loads_json(text_data)
        except JSONNestingError as exc:  # "[[[[...": valid JSON, but past any frame we speak
            await self.error("invalid", str(exc))
            return
        except ValueError:
            await self.error("invalid", _("The frame is not valid JSON."))
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type", ""), str):  # a list type is unhashable
            await self.error("invalid", _("A frame must be a JSON object with a type."))
            return
        handler = {
            "message": self.on_message,
            "cancel": self.on_cancel,
            "feedback": self.on_feedback,
            "handoff": self.on_handoff,
            "join": self.on_join,
            "rate": self.on_rate,
        }.get(frame.get("type"))
        if handler is None:
            await self.error("invalid", _("Unknown frame type; use message, cancel, feedback, handoff, join or rate."))
            return
        try:
            await handler(frame)
        except services.ChatError as exc:
            await self.error(exc.code, exc.detail, reply_to=frame["type"])

    async def _within_rate(self):
        now = time.monotonic()
        self.frame_times = [t for t in self.frame_times if now - t < 10] + [now]
        limit = settings.CSP_CHAT_FRAMES_PER_10S
        if len(self.frame_times) > 2 * limit:
            _cool_down(self.scope)
            await self.close(code=CLOSE_POLICY_VIOLATION)
            return False
        if len(self.frame_times) > limit:
            await self.error("rate_limited", _("Too many messages; slow down."))
            return False
        return True

    async def on_cancel(self, frame):
        answer = await self._stop_generation()
        if answer is not None:  # the stopped answer ends like any other, marked cancelled
            await self.send_json(self._done_frame(answer, answer.adapter_name or None))

    async def on_feedback(self, frame):
        answer = await database_sync_to_async(services.message_rate)(
            message_id=frame.get("message"),
            rating=frame.get("rating"),
            comment=frame.get("comment") or "",
            session_key=self.session_key,
            user=self.user,
        )
        await self.send_json({"type": "feedback", "message": answer.pk, "rating": answer.rating})

    def _own_conversation(self, conversation_id, *, create=False):
        if not conversation_id and not create:
            raise services.ChatError("invalid", _("Say which conversation."))
        if not conversation_id:
            self._ensure_session()
        return services.conversation_for(conversation_id=conversation_id, session_key=self.session_key, user=self.user)

    async def on_handoff(self, frame):
        """The customer asks for a person (the page's button); an answer being generated stops."""
        stopped = await self._stop_generation()
        if stopped is not None:  # it ends like a cancelled one, so the page closes its bubble
            await self.send_json(self._done_frame(stopped, stopped.adapter_name or None))

        def request():
            conversation = self._own_conversation(frame.get("conversation"), create=True)
            try:
                return handoff.handoff_request(conversation=conversation)
            except handoff.HandoffRefused:
                if conversation.state in (conversation.State.WAITING, conversation.State.AGENT):
                    return conversation  # asked twice: still waiting, or with an agent already
                raise

        conversation = await database_sync_to_async(request)()
        await self._follow(conversation.pk, conversation.state)
        await self.send_json({"type": "handoff", "state": conversation.state, "conversation": str(conversation.pk)})

    async def on_join(self, frame):
        conversation = await database_sync_to_async(self._own_conversation)(frame.get("conversation"))
        await self._follow(conversation.pk, conversation.state)
        await self.send_json({"type": "handoff", "state": conversation.state, "conversation": str(conversation.pk)})

    async def on_rate(self, frame):
        conversation = await database_sync_to_async(self._own_conversation)(frame.get("conversation"))
        rated = await database_sync_to_async(handoff.conversation_rate)(conversation=conversation, rating=frame.get("rating"))
        await self.send_json({"type": "rated", "conversation": str(rated.pk), "rating": rated.csat})

    def _assistant_answers(self, conversation_id, text):
        """Whether the assistant, not a person, answers this message, as far as this socket knows
        without asking the database: a new conversation, or the one it follows while in the bot's hands."""
        if handoff.asks_for_a_person(text):
            return False
        return not conversation_id or (str(conversation_id) == self.following and self.following_state == "bot")

    async def on_message(self, frame):
        if self.generation is not None and not self.generation.done():
            raise services.ChatError("busy_conversation", _("Wait for the answer, or cancel it, before sending again."))
        text = services.check_message_text(frame.get("text"))
        if self._assistant_answers(frame.get("conversation"), text) and (busy := busy_now()):
            # Refused before any database work: under a flood of messages the busy answers stay
            # instant instead of queueing behind the database thread (issue #6, scenario 13).
            await self.send_json({"type": "busy", "retry_after": busy.retry_after})
            return
        if not frame.get("conversation") and not self.session_key:
            await database_sync_to_async(self._ensure_session)()  # a new conversation is made below
        routed = await database_sync_to_async(handoff.route_customer_message)(
            text=text, conversation_id=frame.get("conversation"), session_key=self.session_key, user=self.user
        )
        if routed is not None:  # a person answers this conversation, not the assistant
            conversation, message = routed
            await self._follow(conversation.pk, conversation.state)
            await self.send_json({"type": "received", "conversation": str(conversation.pk), "message": message.pk})
            await self.send_json({"type": "handoff", "state": conversation.state, "conversation": str(conversation.pk)})
            return
        try:
            session = await answering.answer_astart(
                channel=Conversation.Channel.WEB,
                text=text,
                conversation_id=frame.get("conversation"),
                session_key=self.session_key,
                user=self.user,
            )
        except answering.AnswerRefused as refused:
            if refused.code != "busy":
                raise  # an error frame with its code (too_long, unavailable), as every ChatError
            await self.send_json({"type": "busy", "retry_after": refused.retry_after})
            return
        events = session.events()
        try:
            await self._follow(session.conversation.pk, session.conversation.state)
            await self._send_event(await anext(events))  # `start`, before the socket's next frame is read
        except BaseException:
            await session.stop()
            raise
        self.session = session
        self.generation = asyncio.create_task(self._stream(events))

    async def _stream(self, events):
        async with contextlib.aclosing(events):
            async for event in events:
                await self._send_event(event)

    async def _send_event(self, event):
        """One event of the answer pipeline as this protocol's frames."""
        if isinstance(event, answering.Started):
            await self.send_json(
                {"type": "start", "conversation": str(event.conversation.pk), "message": event.answer.pk, "adapter": event.adapter}
            )
        elif isinstance(event, answering.Text):
            await self.send_json({"type": "token", "text": event.text})
        elif isinstance(event, answering.Replaced):  # the fact guard replaced what was shown
            await self.send_json({"type": "replace", "text": event.text})
        elif isinstance(event, answering.Failed):  # the engine stopped answering
            await self.error(event.code, answering.stopped_detail())
            await self.send_json(self._done_frame(event.answer, event.stats.adapter))
        else:
            if event.stats.finish_reason in ("timeout", "error"):
                reason = event.stats.finish_reason
                await self.error(reason, _("The answer was cut short (%(reason)s).") % {"reason": reason})
            await self.send_json(self._done_frame(event.answer, event.stats.adapter))

    @staticmethod
    def _done_frame(answer, adapter):
        """The end of an answer, from its stored row (however it ended)."""
        return {
            "type": "done",
            "message": answer.pk,
            "latency_ms": answer.latency_ms,
            "first_token_ms": answer.first_token_ms,
            "tokens": answer.tokens,
            "adapter": adapter,
            "finish_reason": answer.finish_reason,
            "mode": answer.mode,
            "sources": grounding.wire_sources(answer.sources),
            "used": answer.used,
            "cited": grounding.cited_questions(answer.sources, answer.used),
            # The fallback reply offers a person (the chat page shows the handoff button with it)
            # and the curated questions that came close: asking one gets its curated answer.
            **grounding.offers(answer.sources, answer.mode),
        }

    async def _stop_generation(self):
        """Cancel the answer being generated; returns its stored row, or None when there was none."""
        task, self.generation = self.generation, None
        if task is None or task.done():
            return None
        task.cancel()  # the session stops the decode and stores what was said, marked cancelled
        try:
            await task
        except asyncio.CancelledError:
            pass
        await self.session.stop()  # a task cancelled before it first ran never read the session
        return self.session.answer
