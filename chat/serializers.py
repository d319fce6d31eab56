"""REST representations of chat: a question and its answer, conversations, feedback.

Request fields are strict JSON types (a question is text, never a number; a conversation id is a
UUID string, never the integer DRF's UUIDField would also take). Limits are read from settings
when a request is checked, so a changed CSP_CHAT_* setting applies without a restart.
"""

import math

from django.conf import settings
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from chat import services
from llm.engine import FINISH_REASONS
from chat.models import Conversation, Message
from csplatform.api_fields import NumberField, TextField, WholeNumberField

# Above OpenAI's documented range nothing is meaningful; the engine clamps further to its own cap.
MAX_CLIENT_TEMPERATURE = 2.0
# Sampling this cold is greedy decoding in all but name, and a temperature near zero (1e-185 is
# a valid JSON number) overflows the logits it divides into inf/NaN: send those as 0 (greedy).
GREEDY_BELOW = 1e-3


def sampling_temperature(value):
    """The temperature to ask the engine for: 0 (greedy) for anything colder than GREEDY_BELOW."""
    return 0.0 if value < GREEDY_BELOW else float(value)


class ConversationIdField(serializers.UUIDField):
    """A conversation id: a UUID string. DRF's UUIDField also turns the integer 5 into a UUID."""

    default_error_messages = {"not_text": _("Must be a UUID string, not {type}.")}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_text", type=type(data).__name__)
        return super().to_internal_value(data)


@extend_schema_field({"type": "integer", "enum": [1, -1]})
class RatingField(WholeNumberField):
    """👍 is 1, 👎 is -1; nothing else (not "1", not true)."""

    default_error_messages = {"not_a_rating": _("Must be 1 or -1.")}

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if value not in (1, -1):
            self.fail("not_a_rating")
        return value


@extend_schema_serializer(deprecate_fields=["message"])
class ChatRequestSerializer(serializers.Serializer):
    """A question: `text`, or the deprecated `message` that older clients send (exactly one)."""

    text_field = "text"  # after validation: the name the question came under
    conversation = ConversationIdField(
        required=False,
        allow_null=True,
        default=None,
        help_text=_("Continue this conversation of yours; null or absent starts a new one."),
    )
    max_new_tokens = WholeNumberField(
        required=False,
        min_value=1,
        help_text=_("At most this many tokens in the answer; capped by the server (CSP_CHAT_MAX_NEW_TOKENS)."),
    )
    temperature = NumberField(
        required=False,
        min_value=0,
        max_value=MAX_CLIENT_TEMPERATURE,
        help_text=_(
            "0 (the default) answers greedily: the trained answer; below 0.001 counts as 0. Capped by the server."
        ),
    )

    def get_fields(self):
        fields = super().get_fields()
        # Built per request: the cap is CSP_CHAT_MAX_MESSAGE_CHARS as it is now, and a longer
        # question is refused here, before the engine spends a tokenizer call on it. Neither
        # field is required on its own: validate() requires exactly one of the two.
        limit = settings.CSP_CHAT_MAX_MESSAGE_CHARS
        text = TextField(
            required=False,
            max_length=limit,
            help_text=_("The customer's question. Required (unless the deprecated `message` is sent instead)."),
        )
        message = TextField(
            required=False,
            max_length=limit,
            help_text=_("Deprecated: the former name of `text`, still accepted. Send one of the two, not both."),
        )
        return {"text": text, "message": message, **fields}

    def validate_text(self, value):
        return _checked_question(value)

    def validate_message(self, value):
        return _checked_question(value)

    def validate(self, attrs):
        if "text" in attrs and "message" in attrs:
            raise serializers.ValidationError(
                {"message": [_("Send the question as `text` only: `message` is its deprecated alias, not a second field.")]}
            )
        if "text" not in attrs and "message" not in attrs:
            raise serializers.ValidationError({"text": [self.fields["text"].error_messages["required"]]})
        self.text_field = "message" if "message" in attrs else "text"
        attrs["text"] = attrs.pop(self.text_field)
        return attrs

    def validate_temperature(self, value):
        if not math.isfinite(value):
            raise serializers.ValidationError(_("Must be a finite number."))
        return sampling_temperature(value)


def _checked_question(value):
    # The same check the websocket makes (the field has already stripped and measured it).
    try:
        return services.check_message_text(value)
    except services.ChatError as exc:
        raise serializers.ValidationError(exc.detail) from None


class SuggestionSerializer(serializers.Serializer):
    pair = serializers.IntegerField(help_text=_("The Q&A pair's id."))
    question = serializers.CharField(help_text=_("Its question, as a customer would ask it."))


class SourceSerializer(serializers.Serializer):
    pair = serializers.IntegerField(help_text=_("The Q&A pair's id."))
    rank = serializers.IntegerField()
    score = serializers.FloatField(help_text=_("Similarity of the question to the pair, 0..1."))


class ChatAnswerSerializer(serializers.Serializer):
    conversation = serializers.UUIDField(help_text=_("Send it back to continue the conversation."))
    message = serializers.IntegerField(help_text=_("The answer's id, for feedback."))
    answer = serializers.CharField(allow_blank=True)
    adapter = serializers.CharField(allow_null=True, help_text=_("The adapter version that answered; null: the base model."))
    latency_ms = serializers.IntegerField(allow_null=True)
    first_token_ms = serializers.IntegerField(allow_null=True, help_text=_("null when no token was generated."))
    tokens = serializers.IntegerField()
    finish_reason = serializers.ChoiceField(
        choices=(*FINISH_REASONS, "corrected", "fallback"),
        help_text=_("stop: the answer ended; length: max_new_tokens reached; timeout: CSP_CHAT_MAX_SECONDS "
                    "passed; cancelled: a streaming client went away; error: the model failed (the text is what came before); "
                    "corrected / fallback: the fact guard replaced a generated answer by the curated answer / the fallback reply."),
    )
    mode = serializers.ChoiceField(
        choices=("", "curated", "grounded", "fallback"),
        help_text=_("curated: a curated answer, verbatim; grounded: generated from the retrieved pairs; fallback: the "
                    "knowledge base has no answer (a person is offered); empty: grounding is off."),
    )
    sources = SourceSerializer(many=True, help_text=_("The approved Q&A pairs retrieved for the question, best first."))
    used = serializers.ListField(child=serializers.IntegerField(), help_text=_("Ids of the retrieved pairs the answer drew on."))
    handoff_offered = serializers.BooleanField(help_text=_("The reply offers a person: ask for one with the handoff endpoint."))
    suggestions = SuggestionSerializer(
        many=True,
        help_text=_("With the fallback reply: curated questions that came close (CSP_CHAT_SUGGESTIONS). Asking one "
                    "word for word gets its curated answer."),
    )


class ChatErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField(help_text=_("not_found, busy or unavailable."))


class MessageSerializer(serializers.ModelSerializer):
    adapter = serializers.SerializerMethodField()
    rating = serializers.IntegerField(allow_null=True, read_only=True, help_text=_("1 (👍), -1 (👎) or null."))

    class Meta:
        model = Message
        fields = [
            "id", "role", "text", "adapter", "tokens", "latency_ms", "first_token_ms", "finish_reason", "rating",
            "feedback_comment", "created_at",
        ]
        read_only_fields = fields

    def get_adapter(self, message) -> str | None:
        if message.role != Message.Role.ASSISTANT:
            return None
        return message.adapter_name or None


class ConversationSerializer(serializers.ModelSerializer):
    message_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "channel", "title", "created_at", "updated_at", "message_count"]
        read_only_fields = fields


class ConversationDetailSerializer(ConversationSerializer):
    messages = MessageSerializer(many=True, read_only=True)

    class Meta(ConversationSerializer.Meta):
        fields = [*ConversationSerializer.Meta.fields, "messages"]
        read_only_fields = fields


class FeedbackSerializer(serializers.Serializer):
    rating = RatingField(help_text=_("1 for 👍, -1 for 👎."))
    comment = TextField(required=False, allow_blank=True, default="", max_length=2000)


class FeedbackResultSerializer(serializers.Serializer):
    message = serializers.IntegerField()
    rating = serializers.IntegerField()
    comment = serializers.CharField(allow_blank=True)


class HandoffRoutedSerializer(serializers.Serializer):
    conversation = serializers.UUIDField(help_text="The conversation the message was stored in.")
    message = serializers.IntegerField(help_text="The stored message's id.")
    state = serializers.ChoiceField(
        choices=["waiting", "agent"], help_text="waiting: for a person to take it; agent: a person has it."
    )
