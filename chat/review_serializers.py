"""REST representations of the review queue: an answer to review, and a reviewer's draft from it."""

from django.utils.translation import gettext_lazy as _
from rest_framework import serializers

from chat.models import ReviewItem
from csplatform.api_fields import TextField
from knowledge.models import Category, QAPair
from knowledge.serializers import CategoryNameField


class ReviewItemSerializer(serializers.ModelSerializer):
    """An answer in the review queue, with the customer's question it answered."""

    question = serializers.SerializerMethodField(help_text=_("The customer's message this answer replied to."))
    answer = serializers.CharField(source="text", read_only=True, help_text=_("What the assistant answered."))
    adapter = serializers.SerializerMethodField(help_text=_("The adapter version that answered; null for the base model."))
    draft_pairs = serializers.PrimaryKeyRelatedField(many=True, read_only=True, help_text=_("Q&A pairs drafted from it."))

    class Meta:
        model = ReviewItem
        fields = [
            "id", "conversation", "question", "answer", "adapter", "rating", "feedback_comment", "flagged",
            "review_status", "reviewed_at", "draft_pairs", "created_at",
        ]
        read_only_fields = fields

    def get_question(self, item) -> str:
        question = item.question()
        return question.text if question is not None else ""

    def get_adapter(self, item) -> str | None:
        return item.adapter_name or None


class DraftFromAnswerSerializer(serializers.Serializer):
    instruction = TextField(
        required=False, max_length=QAPair._meta.get_field("instruction").max_length,
        help_text=_("The question to learn; default: the customer's message."),
    )
    input = TextField(required=False, allow_blank=True, default="", max_length=QAPair._meta.get_field("input").max_length)
    output = TextField(max_length=QAPair._meta.get_field("output").max_length, help_text=_("The corrected answer."))
    category = CategoryNameField(
        slug_field="name", queryset=Category.objects.all(), allow_null=True, required=False, default=None,
        error_messages={"does_not_exist": _("There is no category named {value}; create it first.")},
    )
