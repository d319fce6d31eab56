"""REST chat (/api/v1/chat/): ask and get the whole answer or a stream of it, list your
conversations, rate answers.

These are plain synchronous DRF views: under ASGI Django runs them in a worker thread, so waiting
for an answer (`request.result(timeout)`) holds that thread, never the event loop.

`POST /api/v1/chat/?stream=1` answers with Server-Sent Events (see AnswerStream): everything that
can refuse the question (validation, busy, too long, not found, unavailable) is decided in the
view, so a refusal is an ordinary JSON response with its status; once the `start` event is sent
the status is 200 and the end is reported in the stream (`done` or `error`).

Conversations belong to the authenticated user (token or session), customers included; another
user's conversation or answer is answered 404, exactly like one that does not exist.
"""

import asyncio
import collections
import json
import logging
import threading
import time

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db import transaction
from django.db.models import Count
from django.http import StreamingHttpResponse
from django.utils.translation import gettext as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import handoff, services
from llm.engine import Done, EngineBusy, EngineError, InputTooLong, Token
from chat.models import Conversation, Message
from chat.serializers import (
    HandoffRoutedSerializer,
    ChatAnswerSerializer,
    ChatErrorSerializer,
    ChatRequestSerializer,
    ConversationDetailSerializer,
    ConversationSerializer,
    FeedbackResultSerializer,
    FeedbackSerializer,
)
from chat.serving import active_engine
from llm.finetune import BaseModelError

logger = logging.getLogger(__name__)

# Beyond CSP_CHAT_MAX_SECONDS the engine ends an answer itself ("timeout"); this only guards
# against waiting forever should it not.
WAIT_GRACE_SECONDS = 10
# ?stream= values: the usual spellings of a boolean flag, nothing looser ("yes", "on", "").
STREAM_VALUES = {"1": True, "true": True, "0": False, "false": False}


def busy_response(exc):
    return Response(
        {"detail": _("The assistant is busy; retry in %(seconds)s s.") % {"seconds": exc.retry_after}, "code": "busy"},
        status=status.HTTP_429_TOO_MANY_REQUESTS,
        headers={"Retry-After": str(exc.retry_after)},
    )


def unavailable_response(exc):
    # The operator's problem (CSP_BASE_MODEL or an adapter's files missing), not the client's:
    # the detail names it, the log keeps the path.
    logger.error("chat is unavailable: %s", exc)
    return Response(
        {"detail": _("The assistant is not available: its model cannot be loaded."), "code": "unavailable"},
        status=status.HTTP_503_SERVICE_UNAVAILABLE,
    )


def stopped_detail():
    return _("The assistant stopped answering; try again later.")


def ready_engine():
    """The engine on the active adapter, its model loaded; raises what makes chat unavailable."""
    engine = active_engine()
    engine.load()
    return engine


def stream_requested(query_params):
    """Whether ?stream= asks for Server-Sent Events; a value that is not a flag is a 400."""
    value = query_params.get("stream")
    if value is None:
        return False
    if value.lower() not in STREAM_VALUES:
        raise ValidationError({"stream": [_("Must be 1 or true (stream), 0 or false (one JSON answer).")]})
    return STREAM_VALUES[value.lower()]


def answer_body(*, conversation, answer, text, stats):
    """The whole answer, as the JSON response and the stream's `done` event give it."""
    return ChatAnswerSerializer(
        {
            "conversation": conversation.pk,
            "message": answer.pk,
            "answer": text,
            "adapter": stats.adapter,
            "latency_ms": answer.latency_ms,
            "first_token_ms": answer.first_token_ms,
            "tokens": stats.tokens,
            "finish_reason": stats.finish_reason,
        }
    ).data


def sse(name, data):
    # json.dumps escapes newlines, so each event's data is one line.
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class AnswerStream:
    """One answer sent as Server-Sent Events: `start`, a `token` per piece of text, then `done`
    (the stored answer, as the JSON response gives it) or `error` ({"code", "detail"}).

    The engine calls `on_event` on its decode thread; the events wait here until the response
    reads them. Which kind of generator reads them matters: Django sends an async generator's
    chunks as they come under ASGI (daphne), but would first collect a sync generator whole
    there (sync_to_async(list)), and the reverse under WSGI. So the response gets `aframes()`
    under ASGI and `frames()` under WSGI (the test client, a WSGI server), with the same events.

    A client that goes away closes the generator (under ASGI Django cancels the task reading
    it): the engine request is cancelled, and the answer is stored as it stands, marked
    "cancelled". The answer is stored before the `done` event is sent.
    """

    def __init__(self, *, conversation, answer):
        self.conversation, self.answer, self.pending = conversation, answer, None
        self._events = collections.deque()
        self._arrived = threading.Condition()
        self._waker = None  # (loop, asyncio.Event) of the async reader
        self._stored = False
        # Read in the view, where the request's language is active (the generator runs after).
        self._stopped = stopped_detail()

    def on_event(self, event):
        """Called by the engine on its decode thread: keep it short."""
        with self._arrived:
            self._events.append(event)
            self._arrived.notify_all()
            waker = self._waker
        if waker is not None:
            loop, flag = waker
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that loop is closed: nobody reads this stream any more
                self.pending.cancel()

    def response(self, *, asgi):
        response = StreamingHttpResponse(self.aframes() if asgi else self.frames(), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response

    # --- the events ---

    def _start(self):
        return sse("start", {"conversation": str(self.conversation.pk), "message": self.answer.pk, "adapter": self.pending.adapter})

    def _store(self):
        services.message_finish_answer(answer=self.answer, text=self.pending.text, stats=self.pending.stats)
        self._stored = True

    def _end(self):
        """The last event, once the answer is stored."""
        if not self.pending.done:  # the decode loop is gone (see ChatView.post)
            logger.error("chat request %s never finished; the engine is not decoding", self.pending.id)
            return sse("error", {"code": "unavailable", "detail": self._stopped})
        return sse(
            "done",
            answer_body(conversation=self.conversation, answer=self.answer, text=self.pending.text, stats=self.pending.stats),
        )

    # --- read from a thread (WSGI) ---

    def _next(self, timeout):
        with self._arrived:
            if not self._arrived.wait_for(lambda: self._events, max(timeout, 0)):
                return None
            return self._events.popleft()

    def _wait_done(self, timeout):
        try:
            self.pending.result(timeout)
        except TimeoutError:
            pass

    def frames(self):
        try:
            yield self._start()
            deadline = time.monotonic() + settings.CSP_CHAT_MAX_SECONDS + WAIT_GRACE_SECONDS
            while True:
                event = self._next(deadline - time.monotonic())
                if event is None or isinstance(event, Done):
                    break
                if isinstance(event, Token):
                    yield sse("token", {"text": event.text})
            self.pending.cancel()  # a no-op when it finished; the deadline passed otherwise
            self._wait_done(WAIT_GRACE_SECONDS)
            self._store()
            yield self._end()
        finally:
            if not self._stored:  # the client went away: stop the decode, keep what was said
                self.pending.cancel()
                self._wait_done(WAIT_GRACE_SECONDS)
                self._store()

    # --- read from the event loop (ASGI) ---

    async def _anext(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._arrived:
                if self._events:
                    return self._events.popleft()
                if self._waker is None or self._waker[0] is not loop:
                    self._waker = (loop, asyncio.Event())
                flag = self._waker[1]
                # Cleared under the lock: an event appended after this sets it again.
                flag.clear()
            await flag.wait()

    async def aframes(self):
        try:
            yield self._start()
            deadline = asyncio.get_running_loop().time() + settings.CSP_CHAT_MAX_SECONDS + WAIT_GRACE_SECONDS
            while True:
                try:
                    # The deadline covers the waits only, never a yield (it would cancel the sender).
                    async with asyncio.timeout_at(deadline):
                        event = await self._anext()
                except TimeoutError:
                    break
                if isinstance(event, Done):
                    break
                if isinstance(event, Token):
                    yield sse("token", {"text": event.text})
            self.pending.cancel()
            await asyncio.to_thread(self._wait_done, WAIT_GRACE_SECONDS)
            await sync_to_async(self._store)()
            yield self._end()
        finally:
            if not self._stored:
                self.pending.cancel()  # within one decode step
                await asyncio.to_thread(self._wait_done, WAIT_GRACE_SECONDS)
                await sync_to_async(self._store)()


ERRORS = {
    404: OpenApiResponse(ChatErrorSerializer, description="No such conversation of yours."),
    409: OpenApiResponse(ChatErrorSerializer, description="The conversation is closed (code `closed`); start a new one."),
    429: OpenApiResponse(
        ChatErrorSerializer, description="The assistant is busy (also before a stream starts); see Retry-After."
    ),
    503: OpenApiResponse(
        ChatErrorSerializer, description="The model cannot be loaded (CSP_BASE_MODEL or the adapter's files)."
    ),
}
# OpenAPI 3.0 has no schema for a whole event stream: this one describes each event.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["start", "token", "done", "error"]},
        "data": {"type": "string", "description": "One line of JSON; its fields depend on the event (see above)."},
    },
}
STREAM_DESCRIPTION = """With `?stream=1`: Server-Sent Events, each `event: <name>` and one line of JSON `data`:

- `start`: `{"conversation", "message", "adapter"}` (`message`: the answer's id);
- `token`: `{"text"}`, one per piece of the answer, in order;
- `done`: the stored answer, the same object as the JSON response;
- or, instead of `done`, `error`: `{"code", "detail"}` when the model stopped answering.

A client that closes the connection stops the answer: it is stored as far as it got, with
`finish_reason` "cancelled"."""


@extend_schema(tags=["chat"])
class ChatView(APIView):
    @extend_schema(
        summary="Ask the assistant",
        description=(
            "Stores the question in your conversation (a new one when `conversation` is null) and "
            "answers with the whole generated text once it is complete, or, with `?stream=1`, as "
            "Server-Sent Events while it is generated. The active adapter version answers; `adapter` "
            "says which. A refused request (busy, too long, not yours) stores nothing and is a JSON "
            "error with its status, streaming or not. The question is `text`; `message` is its "
            "deprecated former name, still accepted (send one of the two)."
        ),
        parameters=[
            OpenApiParameter(
                "stream",
                OpenApiTypes.STR,
                OpenApiParameter.QUERY,
                enum=list(STREAM_VALUES),
                description="1 or true: answer as Server-Sent Events (text/event-stream); 0, false or absent: one JSON answer.",
            )
        ],
        request=ChatRequestSerializer,
        responses={
            (200, "application/json"): ChatAnswerSerializer,
            (200, "text/event-stream"): OpenApiResponse(
                SSE_EVENT_SCHEMA,
                description=STREAM_DESCRIPTION,
                examples=[
                    OpenApiExample(
                        "stream",
                        media_type="text/event-stream",
                        value=(
                            'event: start\ndata: {"conversation": "0b7f…", "message": 42, "adapter": "v3"}\n\n'
                            'event: token\ndata: {"text": "您好！"}\n\n'
                            'event: done\ndata: {"conversation": "0b7f…", "message": 42, "answer": "您好！…", '
                            '"adapter": "v3", "latency_ms": 812, "first_token_ms": 95, "tokens": 37, "finish_reason": "stop"}\n\n'
                        ),
                    )
                ],
            ),
            (202, "application/json"): OpenApiResponse(
                HandoffRoutedSerializer,
                description=(
                    "A person answers this conversation (it waits for or is with an agent, or the text asked "
                    "for one: CSP_HANDOFF_KEYWORDS): the message is stored for them and the assistant does not "
                    "answer. Their replies appear in the conversation (GET /api/v1/chat/conversations/{id}/)."
                ),
            ),
            **{(code, "application/json"): response for code, response in ERRORS.items()},
        },
    )
    def post(self, request):
        stream = stream_requested(request.query_params)
        params = ChatRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            routed = handoff.route_customer_message(
                text=data["text"], conversation_id=data["conversation"], user=request.user, channel=Conversation.Channel.API
            )
        except services.ChatError as exc:
            code = status.HTTP_409_CONFLICT if exc.code == "closed" else status.HTTP_404_NOT_FOUND
            return Response({"detail": exc.detail, "code": exc.code}, status=code)
        if routed is not None:
            conversation, message = routed
            body = {"conversation": conversation.pk, "message": message.pk, "state": conversation.state}
            return Response(HandoffRoutedSerializer(body).data, status=status.HTTP_202_ACCEPTED)
        try:
            engine = ready_engine()
        except (BaseModelError, FileNotFoundError, EngineError) as exc:
            return unavailable_response(exc)

        streaming = None
        pending = None
        try:
            # One transaction: a refusal (busy, too long, not yours) rolls the question back, so a
            # client that retries does not leave the same question twice.
            with transaction.atomic():
                conversation = services.conversation_for(
                    conversation_id=data["conversation"], user=request.user, channel=Conversation.Channel.API
                )
                history, _question = services.message_add_question(conversation=conversation, text=data["text"])
                options = {"max_new_tokens": data.get("max_new_tokens"), "temperature": data.get("temperature")}
                if stream:
                    # Its on_event needs the answer row, made after submit: events wait in it till then.
                    streaming = AnswerStream(conversation=conversation, answer=None)
                    options["on_event"] = streaming.on_event
                pending = engine.submit(history, **options)
                answer = services.message_start_answer(conversation=conversation, adapter_name=pending.adapter)
        except services.ChatError as exc:
            return Response({"detail": exc.detail, "code": exc.code}, status=status.HTTP_404_NOT_FOUND)
        except EngineBusy as exc:
            return busy_response(exc)
        except InputTooLong as exc:
            return Response({params.text_field: [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
        except EngineError as exc:  # closed, or a remote backend that does not answer
            return unavailable_response(exc)
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise

        if streaming is not None:
            streaming.answer, streaming.pending = answer, pending
            return streaming.response(asgi=isinstance(request._request, ASGIRequest))

        try:
            text, stats = pending.result(timeout=settings.CSP_CHAT_MAX_SECONDS + WAIT_GRACE_SECONDS)
        except TimeoutError:
            pending.cancel()
            try:
                text, stats = pending.result(timeout=WAIT_GRACE_SECONDS)
            except TimeoutError:
                # The engine ends every answer by CSP_CHAT_MAX_SECONDS; one that doesn't means
                # its decode loop is gone. Keep what was said and say so.
                services.message_finish_answer(answer=answer, text=pending.text, stats=pending.stats)
                logger.error("chat request %s never finished; the engine is not decoding", pending.id)
                return Response({"detail": stopped_detail(), "code": "unavailable"}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        services.message_finish_answer(answer=answer, text=text, stats=stats)
        return Response(answer_body(conversation=conversation, answer=answer, text=text, stats=stats))


@extend_schema(tags=["chat"])
@extend_schema_view(
    list=extend_schema(summary="List your conversations", description="Most recent first; paginated."),
    retrieve=extend_schema(summary="Show one of your conversations with its messages"),
)
class ConversationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Conversation.objects.none()  # the caller's own: see get_queryset
    serializer_class = ConversationSerializer
    # Any path segment reaches the view, so a malformed id is a JSON 404 like an unknown one.
    lookup_value_regex = "[^/]+"
    filter_backends = []

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no user
            return Conversation.objects.none()
        # Ordered here: an aggregating query does not use the model's Meta.ordering.
        conversations = (
            Conversation.objects.filter(user=self.request.user)
            .annotate(message_count=Count("messages"))
            .order_by("-updated_at", "-created_at", "pk")
        )
        if self.action == "retrieve":
            conversations = conversations.prefetch_related("messages")
        return conversations

    def get_serializer_class(self):
        return ConversationDetailSerializer if self.action == "retrieve" else ConversationSerializer


@extend_schema(tags=["chat"])
class MessageViewSet(viewsets.GenericViewSet):
    queryset = Message.objects.none()  # only the feedback action; message_rate checks ownership
    serializer_class = FeedbackSerializer
    lookup_value_regex = "[^/]+"
    filter_backends = []

    @extend_schema(
        summary="Rate an answer",
        description="👍 (1) or 👎 (-1) on an answer in one of your conversations, with an optional comment.",
        request=FeedbackSerializer,
        responses={200: FeedbackResultSerializer},
    )
    @action(detail=True, methods=["post"])
    def feedback(self, request, pk=None):
        params = FeedbackSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            answer = services.message_rate(
                message_id=pk,
                rating=params.validated_data["rating"],
                comment=params.validated_data["comment"],
                user=request.user,
            )
        except services.ChatError as exc:
            code = status.HTTP_404_NOT_FOUND if exc.code == "not_found" else status.HTTP_400_BAD_REQUEST
            return Response({"detail": exc.detail, "code": exc.code}, status=code)
        return Response({"message": answer.pk, "rating": answer.rating, "comment": answer.feedback_comment})
