"""Human handoff: one state machine for a conversation, bot → waiting → agent → closed.

    event     who        from                  to
    request   customer   bot                   waiting   (the page's button, or a keyword in a message)
    take      staff      bot, waiting, agent   agent     (from agent: another staff member takes it)
    reply     staff      waiting, agent        agent     (stores the staff reply; taking it implicitly)
    release   staff      waiting, agent        bot       (the assistant answers again)
    close     staff      bot, waiting, agent   closed
    rate      customer   closed                closed    (CSAT 1-5, once)

Anything else is refused with HandoffRefused naming the state. Every change is made under a row
lock and, once committed, announced to the conversation's channel-layer group, so the customer's
open websocket hears it live, on whichever process holds it (in-memory layer in one process,
channels-redis across processes).
"""

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from chat.models import Conversation, Message
from chat.services import ChatError, conversation_for, is_uuid

State = Conversation.State

TRANSITIONS = {
    "request": ({State.BOT}, State.WAITING),
    "take": ({State.BOT, State.WAITING, State.AGENT}, State.AGENT),
    "reply": ({State.WAITING, State.AGENT}, State.AGENT),
    "release": ({State.WAITING, State.AGENT}, State.BOT),
    "close": ({State.BOT, State.WAITING, State.AGENT}, State.CLOSED),
}


EVENT_LABELS = {
    "request": gettext_lazy("ask for a person"),
    "take": gettext_lazy("take over"),
    "reply": gettext_lazy("reply"),
    "release": gettext_lazy("hand back to the assistant"),
    "close": gettext_lazy("close"),
    "rate": gettext_lazy("rate the conversation"),
}


class HandoffRefused(ChatError):
    def __init__(self, event, state):
        super().__init__(
            "invalid_state",
            _("This conversation is %(state)s; “%(event)s” is not possible now.")
            % {"state": State(state).label.lower(), "event": EVENT_LABELS[event]},
        )
        self.event, self.state = event, state


def group_name(conversation_id):
    """The channel-layer group of one conversation's customer sockets."""
    return f"conversation.{conversation_id}"


def broadcast(conversation_id, message):
    """Send a message to the conversation's sockets once the current transaction commits."""
    layer = get_channel_layer()
    if layer is None:
        return
    transaction.on_commit(lambda: async_to_sync(layer.group_send)(group_name(conversation_id), message))


def asks_for_a_person(text):
    """Whether a customer's message is a request for a human (CSP_HANDOFF_KEYWORDS)."""
    folded = text.casefold()
    return any(keyword.casefold() in folded for keyword in settings.CSP_HANDOFF_KEYWORDS if keyword)


def _transition(conversation_id, event, *, agent=None, extra=None):
    """Lock the row, check the move, apply it; returns the conversation as it is now."""
    allowed, target = TRANSITIONS[event]
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=conversation_id)
        if conversation.state not in allowed:
            raise HandoffRefused(event, conversation.state)
        fields = ["state", "updated_at"]
        now = timezone.now()
        if event == "request":
            conversation.handoff_requested_at = now
            fields.append("handoff_requested_at")
        if target == State.AGENT and agent is not None and conversation.agent_id != agent.pk:
            conversation.agent = agent
            fields.append("agent")
        if target == State.CLOSED:
            conversation.closed_at = now
            fields.append("closed_at")
        changed = conversation.state != target
        conversation.state = target
        conversation.save(update_fields=fields)
        if changed:  # announced first: the customer sees "with an agent", then the reply
            broadcast(conversation.pk, {"type": "handoff.state", "state": target})
        if extra is not None:
            extra(conversation)
    return conversation


def handoff_request(*, conversation):
    """The customer asks for a person: waiting for an agent (staff see it at the top of the admin)."""
    return _transition(conversation.pk, "request")


def handoff_take(*, conversation, agent):
    return _transition(conversation.pk, "take", agent=agent)


def handoff_release(*, conversation, agent):
    """Hand the conversation back to the assistant."""
    return _transition(conversation.pk, "release", agent=agent)


def handoff_close(*, conversation, agent):
    return _transition(conversation.pk, "close", agent=agent)


def handoff_reply(*, conversation, agent, text):
    """Store a staff reply and deliver it to the customer's open socket; returns the Message."""
    text = (text or "").strip()
    if not text:
        raise ChatError("invalid", _("The reply is empty."))
    if len(text) > settings.CSP_CHAT_MAX_MESSAGE_CHARS * 4:
        raise ChatError("too_long", _("The reply is too long."))
    stored = []

    def store(locked):
        reply = Message.objects.create(conversation=locked, role=Message.Role.AGENT, text=text, sent_by=agent)
        stored.append(reply)
        broadcast(locked.pk, {"type": "handoff.agent", "text": text, "message": reply.pk})

    _transition(conversation.pk, "reply", agent=agent, extra=store)
    return stored[0]


def conversation_rate(*, conversation, rating):
    """CSAT: the customer rates a closed conversation 1-5, once."""
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise ChatError("invalid", _("The rating must be a whole number from 1 to 5."))
    with transaction.atomic():
        locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
        if locked.state != State.CLOSED:
            raise HandoffRefused("rate", locked.state)
        if locked.csat is not None:
            raise ChatError("invalid_state", _("This conversation was rated already."))
        locked.csat = rating
        locked.save(update_fields=["csat"])
    return locked


def waiting_count():
    return Conversation.objects.filter(state=State.WAITING).count()


def route_customer_message(*, text, conversation_id=None, session_key="", user=None, channel=Conversation.Channel.WEB):
    """Store a customer's message that a person must see, instead of the assistant answering.

    Returns (conversation, message) when the conversation is with (or waiting for) a person, or
    when the message asks for one (which starts the wait); None when the assistant should answer
    (nothing is stored then). A closed conversation takes no more messages.
    """
    wants_person = asks_for_a_person(text)
    if not conversation_id and not wants_person:
        return None
    if not wants_person and is_uuid(conversation_id):
        # The common case, the assistant answering: one read, no write transaction (on SQLite that
        # would take the database's write lock for every message). Ownership is checked where
        # the answer is stored (conversation_for).
        state = Conversation.objects.filter(pk=conversation_id).values_list("state", flat=True).first()
        if state == State.BOT:
            return None
    with transaction.atomic():
        conversation = conversation_for(conversation_id=conversation_id, session_key=session_key, user=user, channel=channel)
        if conversation.state == State.CLOSED:
            raise ChatError("closed", _("This conversation is closed; start a new one."))
        if conversation.state == State.BOT and not wants_person:
            return None
        message = Message.objects.create(conversation=conversation, role=Message.Role.USER, text=text)
        if not conversation.title:
            conversation.title = text[:200]
            conversation.save(update_fields=["title", "updated_at"])
        if conversation.state == State.BOT:
            conversation = handoff_request(conversation=conversation)
        else:
            Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
    return conversation, message
