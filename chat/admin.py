"""Conversations and messages, read-only: the chat writes them, staff read and filter them.
Also the review queue (chat.review_admin), and what chat, the top app, adds to the admin pages of
the apps below it: a Q&A pair's source answer, and the adapter versions' serving status.

The filters on answers (adapter version, rating) are subqueries (Exists), not joins: a join on
messages would repeat a conversation once per matching answer and inflate the counts beside it.
"""

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Avg, Case, Count, Exists, IntegerField, OuterRef, Prefetch, Q, Value, When
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from chat.handoff_admin import HandoffAdminMixin
from chat.inference.client import workers as recent_workers
from chat.models import Conversation, Message, ReviewItem
from chat.review import review_flag
from chat.review_admin import ReviewItemAdmin, cited_in, citations, drafted_from
from chat.serving import engine_status
from knowledge.admin import QAPairAdmin
from training.admin import AdapterVersionAdmin
from training.models import AdapterVersion

ASSISTANT = Message.Role.ASSISTANT
BASE = "base"  # the filters' value for answers from the base model (no adapter)
UNRATED = "none"


class VersionFilter(admin.SimpleListFilter):
    """Answers by adapter version (by name, as in the URL: ?version=v3), or by the base model."""

    title = _("adapter version")
    parameter_name = "version"

    def lookups(self, request, model_admin):
        return [(BASE, _("base model (no adapter)")), *((name, name) for name in AdapterVersion.objects.values_list("name", flat=True))]

    def answers(self):
        if self.value() == BASE:
            return Q(role=ASSISTANT, adapter_name="")
        return Q(role=ASSISTANT, adapter_version__name=self.value())


class ConversationVersionFilter(VersionFilter):
    title = _("answered by adapter version")

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        return queryset.filter(Exists(Message.objects.filter(self.answers(), conversation=OuterRef("pk"))))


class MessageVersionFilter(VersionFilter):
    def queryset(self, request, queryset):
        return queryset if self.value() is None else queryset.filter(self.answers())


class RatingFilter(admin.SimpleListFilter):
    title = _("rating")
    parameter_name = "rating"

    def lookups(self, request, model_admin):
        return [("1", "👍"), ("-1", "👎"), (UNRATED, _("unrated"))]


class ConversationRatingFilter(RatingFilter):
    """👍 / 👎: the conversation has an answer rated so; unrated: none of its answers is rated."""

    title = _("rating of its answers")

    def queryset(self, request, queryset):
        answers = Message.objects.filter(conversation=OuterRef("pk"), role=ASSISTANT)
        if self.value() in ("1", "-1"):
            return queryset.filter(Exists(answers.filter(rating=int(self.value()))))
        if self.value() == UNRATED:
            return queryset.filter(Exists(answers)).exclude(Exists(answers.filter(rating__isnull=False)))
        return queryset


class MessageRatingFilter(RatingFilter):
    """Only answers are rated: "unrated" is an answer without a rating, never a customer's message."""

    def queryset(self, request, queryset):
        if self.value() in ("1", "-1"):
            return queryset.filter(rating=int(self.value()))
        if self.value() == UNRATED:
            return queryset.filter(role=ASSISTANT, rating__isnull=True)
        return queryset


class MessageInline(admin.TabularInline):
    model = Message
    fields = (
        "created_at", "role", "text", "sent_by", "adapter_name", "mode", citations, "latency_ms", "first_token_ms", "tokens",
        "finish_reason", "rating", "feedback_comment",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(HandoffAdminMixin, admin.ModelAdmin):
    """Conversations are written by the chat: staff read them here, and answer the ones waiting
    for a person on their reply page (chat.handoff_admin). Waiting ones are listed first."""

    list_display = (
        "title", "state", "reply", "channel", "user", "message_count", "answer_count", "versions", "mean_latency",
        "last_latency", "ratings", "csat", "created_at", "updated_at",
    )
    list_filter = ("state", ConversationVersionFilter, ConversationRatingFilter, "channel", "created_at")
    list_select_related = ("user",)
    search_fields = ("title", "messages__text")
    date_hierarchy = "created_at"
    readonly_fields = (
        "id", "channel", "session_key", "user", "title", "state", "agent", "handoff_requested_at", "closed_at", "csat",
        "created_at", "updated_at",
    )
    inlines = [MessageInline]

    def get_queryset(self, request):
        answers = Q(messages__role=ASSISTANT)
        urgency = Case(
            When(state=Conversation.State.WAITING, then=Value(0)),
            When(state=Conversation.State.AGENT, then=Value(1)),
            default=Value(2),
            output_field=IntegerField(),
        )
        return (
            super()
            .get_queryset(request)
            .annotate(_urgency=urgency)
            .order_by("_urgency", "-updated_at")
            .annotate(
                _messages=Count("messages"),
                _answers=Count("messages", filter=answers),
                _mean_latency=Avg("messages__latency_ms", filter=answers),
                _up=Count("messages", filter=answers & Q(messages__rating=1)),
                _down=Count("messages", filter=answers & Q(messages__rating=-1)),
            )
            # The page's answers in one query, for the versions and the last latency.
            .prefetch_related(
                Prefetch(
                    "messages",
                    queryset=Message.objects.filter(role=ASSISTANT).only("conversation_id", "adapter_name", "latency_ms", "created_at"),
                    to_attr="answers",
                )
            )
        )

    @admin.display(description=_("person"))
    def reply(self, obj):
        label = _("Reply") if obj.state in (Conversation.State.WAITING, Conversation.State.AGENT) else _("Open")
        return format_html('<a href="{}">{}</a>', self.handoff_url(obj), label)

    @admin.display(description=_("messages"), ordering="_messages")
    def message_count(self, obj):
        return obj._messages

    @admin.display(description=_("answers"), ordering="_answers")
    def answer_count(self, obj):
        return obj._answers

    @admin.display(description=_("adapter versions"))
    def versions(self, obj):
        names = dict.fromkeys(answer.adapter_name or BASE for answer in obj.answers)  # in order of first use
        return ", ".join(names) or "-"

    @admin.display(description=_("mean response time (ms)"), ordering="_mean_latency")
    def mean_latency(self, obj):
        return round(obj._mean_latency) if obj._mean_latency is not None else None

    @admin.display(description=_("last response time (ms)"))
    def last_latency(self, obj):
        return obj.answers[-1].latency_ms if obj.answers else None

    @admin.display(description=_("👍 / 👎"))
    def ratings(self, obj):
        return f"{obj._up} / {obj._down}"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "short_text", "conversation", "role", "adapter_version", "latency_ms", "first_token_ms", "tokens", "rating", "created_at",
    )
    list_filter = (MessageVersionFilter, MessageRatingFilter, "role", "mode", "finish_reason", "conversation__channel", "created_at")
    search_fields = ("text", "feedback_comment")
    list_select_related = ("conversation", "adapter_version")
    date_hierarchy = "created_at"
    readonly_fields = (
        "conversation", "role", "text", "adapter_version", "adapter_name", "latency_ms", "first_token_ms", "tokens",
        "finish_reason", "mode", citations, "rating", "feedback_comment", "flagged", "review_status", "sent_by", "created_at",
    )
    actions = ("flag_for_review",)

    def has_flag_permission(self, request):
        return request.user.has_perm("chat.change_reviewitem")

    @admin.action(description=_("Flag selected answers for the review queue"), permissions=["flag"])
    def flag_for_review(self, request, queryset):
        changed = review_flag(answers=queryset, user=request.user)
        self.message_user(
            request, ngettext("%d answer flagged for review.", "%d answers flagged for review.", changed) % changed, messages.SUCCESS
        )

    @admin.display(description=_("text"), ordering="text")
    def short_text(self, obj):
        return str(obj)  # the first 60 characters

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


admin.site.register(ReviewItem, ReviewItemAdmin)
QAPairAdmin.add_lineage(drafted_from)
QAPairAdmin.add_lineage(cited_in)


def serving_status(request):
    """What serves the adapter versions: this process's engine, and in worker mode the workers."""
    workers = recent_workers() if settings.CSP_INFERENCE_BACKEND == "worker" else None  # the model lives there
    return {"engine": engine_status(), "workers": workers}


AdapterVersionAdmin.add_changelist_context(serving_status)
