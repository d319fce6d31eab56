"""{% waiting_banner %}: the admin's banner of conversations waiting for a person."""

from django import template
from django.urls import reverse

from chat.models import Conversation

register = template.Library()


@register.inclusion_tag("admin/chat/waiting_banner.html", takes_context=True)
def waiting_banner(context):
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.is_active or not user.is_staff or not user.has_perm("chat.view_conversation"):
        return {"count": 0}
    count = Conversation.objects.filter(state=Conversation.State.WAITING).count()
    url = reverse("admin:chat_conversation_changelist") + "?state__exact=" + Conversation.State.WAITING
    return {"count": count, "url": url}
