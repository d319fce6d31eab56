"""REST chat (/api/v1/chat/): ask and get the whole answer or a stream of it, list your
conversations, rate answers.

These are plain synchronous DRF views: under ASGI Django runs them in a worker thread, so waiting
for a whole answer holds that thread, never the event loop. The answer itself is chat.answering's,
as for the websocket and the OpenAI-compatible API: this view formats its events and maps a
refusal's code to a status.

`POST /api/v1/chat/?stream=1` answers with Server-Sent Events (see STREAM_DESCRIPTION): everything
that can refuse the question (validation, busy, too long, not found, unavailable) is decided in
the view, so a refusal is an ordinary JSON response with its status; once the `start` event is
sent the status is 200 and the end is reported in the stream (`done` or `error`).

Conversations belong to the authenticated user (token or session), customers included; another
user's conversation or answer is answered 404, exactly like one that does not exist.
"""

import logging

from django.core.handlers.asgi import ASGIRequest
from django.db.models import Count
from django.utils.translation import gettext as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import answering, grounding, handoff, services
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

logger = logging.getLogger(__name__)

# ?stream= values: the usual spellings of a boolean flag, nothing looser ("yes", "on", "").
STREAM_VALUES = {"1": True, "true": True, "0": False, "false": False}


def stream_requested(query_params):
    """Whether ?stream= asks for Server-Sent Events; a value that is not a flag is a 400."""
    value = query_params.get("stream")
    if value is None:
        return False
    if value.lower() not in STREAM_VALUES:
        raise ValidationError({"stream": [_("Must be 1 or true (stream), 0 or false (one JSON answer).")]})
    return STREAM_VALUES[value.lower()]


def refusal_response(refused, *, text_field):
    """A refused question (chat.answering's codes, and the conversation's) as its JSON error."""
    if refused.code == "too_long":  # a validation error of the question's field, as the serializer's are
        return Response({text_field: [refused.detail]}, status=status.HTTP_400_BAD_REQUEST)
    if refused.code == "busy":
        return Response(
            {"detail": refused.detail, "code": "busy"},
            status=status.HTTP_429_TOO_MANY_REQUESTS,
            headers={"Retry-After": str(refused.retry_after)},
        )
    if refused.code == "unavailable":
        # The operator's problem (CSP_BASE_MODEL or an adapter's files missing), not the client's:
        # the detail names it, the log keeps the path.
        logger.error("chat is unavailable: %s", refused.detail)
        return Response(
            {"detail": answering.unavailable_detail(), "code": "unavailable"}, status=status.HTTP_503_SERVICE_UNAVAILABLE
        )
    code = status.HTTP_409_CONFLICT if refused.code == "closed" else status.HTTP_404_NOT_FOUND
    return Response({"detail": refused.detail, "code": refused.code}, status=code)


def answer_body(*, conversation_id, answer, text, stats, mode="", sources=(), used=()):
    """The whole answer, as the JSON response and the stream's `done` event give it."""
    return ChatAnswerSerializer(
        {
            "conversation": conversation_id,
            "message": answer.pk,
            "answer": text,
            "adapter": stats.adapter,
            "latency_ms": answer.latency_ms,
            "first_token_ms": answer.first_token_ms,
            "tokens": stats.tokens,
            "finish_reason": stats.finish_reason,
            "mode": mode,
            "sources": grounding.wire_sources(sources),
            "used": list(used),
            **grounding.offers(sources, mode),
        }
    ).data


def end_body(conversation_id, end):
    return answer_body(
        conversation_id=conversation_id, answer=end.answer, text=end.text, stats=end.stats,
        mode=end.mode, sources=end.sources, used=end.used,
    )


def sse_frames(event, stopped):
    """One pipeline event as this API's Server-Sent Events (see STREAM_DESCRIPTION)."""
    if isinstance(event, answering.Started):
        data = {"conversation": str(event.conversation.pk), "message": event.answer.pk, "adapter": event.adapter}
        return [answering.sse(data, event="start")]
    if isinstance(event, answering.Text):
        return [answering.sse({"text": event.text}, event="token")]
    if isinstance(event, answering.Replaced):
        return [answering.sse({"text": event.text}, event="replace")]
    if isinstance(event, answering.Finished):
        return [answering.sse(end_body(event.answer.conversation_id, event), event="done")]
    return [answering.sse({"code": event.code, "detail": stopped}, event="error")]


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
- `replace`: `{"text"}`, the fact guard stopped a generated answer: show this text instead of the tokens so far;
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
            if routed is None:
                session = answering.answer_start(
                    channel=Conversation.Channel.API,
                    text=data["text"],
                    conversation_id=data["conversation"],
                    user=request.user,
                    max_new_tokens=data.get("max_new_tokens"),
                    temperature=data.get("temperature"),
                )
        except services.ChatError as refused:
            return refusal_response(refused, text_field=params.text_field)
        if routed is not None:
            conversation, message = routed
            body = {"conversation": conversation.pk, "message": message.pk, "state": conversation.state}
            return Response(HandoffRoutedSerializer(body).data, status=status.HTTP_202_ACCEPTED)

        if stream:
            stopped = answering.stopped_detail()  # read here, where the request's language is active
            return answering.sse_response(
                session, lambda event: sse_frames(event, stopped), asgi=isinstance(request._request, ASGIRequest)
            )
        end = session.result_sync()
        if isinstance(end, answering.Failed):  # the engine stopped answering; what was said is stored
            return Response({"detail": answering.stopped_detail(), "code": end.code}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        return Response(end_body(session.conversation.pk, end))


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
