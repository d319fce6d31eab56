"""The customer chat page (/ and /chat/). The conversation itself runs over the websocket
(/ws/chat/, chat/consumers.py); the page only gives the browser its session and, when asked for
one of its own conversations, that conversation's history."""

from django.conf import settings
from django.shortcuts import render
from django.views.decorators.http import require_safe

from chat import grounding, services
from chat.models import Message

# A reloaded page shows at most this many earlier messages of its conversation.
HISTORY_SHOWN = 100


@require_safe
def chat_page(request):
    return render(request, "chat.html", {"chat_config": chat_config(request), "max_chars": settings.CSP_CHAT_MAX_MESSAGE_CHARS})


def chat_config(request, owner_key=None):
    """What static/js/chat.js starts from (the #chat-config script): the socket's path and the
    requested conversation's history if it is the caller's: the session's, or the widget key's
    when the widget gives one (chat/widget.py). Used by the chat page and the widget."""
    # The websocket handshake cannot set a cookie: without a session made here, every
    # (re)connection would get a fresh one and lose the right to continue its conversation.
    if not request.session.session_key:
        request.session.save()
        request.session.modified = True
    conversation_id, history, state = _own_history(
        request, request.GET.get("conversation", ""), owner_key or request.session.session_key
    )
    return {
        "wsPath": "/ws/chat/",
        "conversation": conversation_id,
        "history": history,
        "state": state,
        "maxChars": settings.CSP_CHAT_MAX_MESSAGE_CHARS,
    }


def _own_history(request, conversation_id, owner_key):
    """(id, messages, handoff state) of the caller's conversation, or (None, [], "bot") for anyone
    else's or none."""
    if not conversation_id:
        return None, [], "bot"
    try:
        conversation = services.conversation_for(
            conversation_id=conversation_id, session_key=owner_key, user=request.user
        )
    except services.ChatError:
        return None, [], "bot"
    rows = (
        conversation.messages.exclude(role=Message.Role.ASSISTANT, text="")
        .order_by("-created_at", "-id")
        .values(*SHOWN_FIELDS, "mode", "sources", "used")[:HISTORY_SHOWN]
    )
    return str(conversation.pk), [_shown(row) for row in reversed(rows)], conversation.state


SHOWN_FIELDS = ("id", "role", "text", "latency_ms", "first_token_ms", "rating", "finish_reason")


def _shown(row):
    """A message as the page shows it again after a reload: an answer keeps what its `done` frame
    showed live (chat/consumers.py): the offer of a person under a fallback reply, its "did you
    mean" questions and the cited source questions (with CSP_CHAT_SHOW_SOURCES)."""
    shown = {field: row[field] for field in SHOWN_FIELDS}
    if row["role"] == Message.Role.ASSISTANT:
        shown.update(grounding.offers(row["sources"], row["mode"]), cited=grounding.cited_questions(row["sources"], row["used"]))
    return shown
