"""REST chat (/api/v1/chat/): ask and get the whole answer, list your conversations, rate answers.

These are plain synchronous DRF views: under ASGI Django runs them in a worker thread, so waiting
for an answer (`request.result(timeout)`) holds that thread, never the event loop. Streaming
clients use the websocket or the OpenAI-compatible endpoint instead.

Conversations belong to the authenticated user (token or session), customers included; another
user's conversation or answer is answered 404, exactly like one that does not exist.
"""

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils.translation import gettext as _
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import services
from chat.engine import EngineBusy, EngineClosed, InputTooLong
from chat.models import Conversation, Message
from chat.serializers import (
    ChatAnswerSerializer,
    ChatErrorSerializer,
    ChatRequestSerializer,
    ConversationDetailSerializer,
    ConversationSerializer,
    FeedbackResultSerializer,
    FeedbackSerializer,
)
from chat.serving import active_engine
from training.finetune import BaseModelError

logger = logging.getLogger(__name__)

# Beyond CSP_CHAT_MAX_SECONDS the engine ends an answer itself ("timeout"); this only guards
# against waiting forever should it not.
WAIT_GRACE_SECONDS = 10


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


def ready_engine():
    """The engine on the active adapter, its model loaded; raises what makes chat unavailable."""
    engine = active_engine()
    engine.load()
    return engine


@extend_schema(tags=["chat"])
class ChatView(APIView):
    @extend_schema(
        summary="Ask the assistant",
        description=(
            "Stores the question in your conversation (a new one when `conversation` is null) and "
            "answers with the whole generated text once it is complete. The active adapter version "
            "answers; `adapter` says which. A refused request (busy, too long) stores nothing."
        ),
        request=ChatRequestSerializer,
        responses={
            200: ChatAnswerSerializer,
            404: OpenApiResponse(ChatErrorSerializer, description="No such conversation of yours."),
            503: OpenApiResponse(
                ChatErrorSerializer, description="The model cannot be loaded (CSP_BASE_MODEL or the adapter's files)."
            ),
        },
    )
    def post(self, request):
        params = ChatRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            engine = ready_engine()
        except (BaseModelError, FileNotFoundError, EngineClosed) as exc:
            return unavailable_response(exc)

        pending = None
        try:
            # One transaction: a refusal (busy, too long, not yours) rolls the question back, so a
            # client that retries does not leave the same question twice.
            with transaction.atomic():
                conversation = services.conversation_for(
                    conversation_id=data["conversation"], user=request.user, channel=Conversation.Channel.API
                )
                history, _question = services.message_add_question(conversation=conversation, text=data["message"])
                pending = engine.submit(
                    history, max_new_tokens=data.get("max_new_tokens"), temperature=data.get("temperature")
                )
                answer = services.message_start_answer(conversation=conversation, adapter_name=pending.adapter)
        except services.ChatError as exc:
            return Response({"detail": exc.detail, "code": exc.code}, status=status.HTTP_404_NOT_FOUND)
        except EngineBusy as exc:
            return busy_response(exc)
        except InputTooLong as exc:
            return Response({"message": [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
        except EngineClosed as exc:
            return unavailable_response(exc)
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise

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
                return Response(
                    {"detail": _("The assistant stopped answering; try again later."), "code": "unavailable"},
                    status=status.HTTP_503_SERVICE_UNAVAILABLE,
                )
        services.message_finish_answer(answer=answer, text=text, stats=stats)
        body = {
            "conversation": conversation.pk,
            "message": answer.pk,
            "answer": text,
            "adapter": stats.adapter,
            "latency_ms": answer.latency_ms,
            "first_token_ms": answer.first_token_ms,
            "tokens": stats.tokens,
            "finish_reason": stats.finish_reason,
        }
        return Response(ChatAnswerSerializer(body).data)


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
