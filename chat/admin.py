from django.contrib import admin
from django.db.models import Count
from django.utils.translation import gettext_lazy as _

from chat.models import Conversation, Message


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("created_at", "role", "text", "adapter_name", "latency_ms", "first_token_ms", "tokens", "finish_reason", "rating", "feedback_comment")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    """Conversations are written by the chat: staff read them here."""

    list_display = ("title", "channel", "user", "message_count", "created_at", "updated_at")
    list_filter = ("channel", "created_at")
    search_fields = ("title", "messages__text")
    date_hierarchy = "created_at"
    readonly_fields = ("id", "channel", "session_key", "user", "title", "created_at", "updated_at")
    inlines = [MessageInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_messages=Count("messages"))

    @admin.display(description=_("messages"), ordering="_messages")
    def message_count(self, obj):
        return obj._messages

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("__str__", "role", "adapter_name", "latency_ms", "first_token_ms", "tokens", "rating", "created_at")
    list_filter = ("role", "rating", "adapter_name", "finish_reason", "created_at")
    search_fields = ("text", "feedback_comment")
    list_select_related = ("conversation",)
    readonly_fields = (
        "conversation", "role", "text", "adapter_version", "adapter_name", "latency_ms", "first_token_ms", "tokens",
        "finish_reason", "rating", "feedback_comment", "created_at",
    )

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
