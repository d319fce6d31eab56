"""Chat workflows on the database shared by the websocket consumer and the HTTP APIs (all
synchronous: async callers wrap them in database_sync_to_async). Starting and storing an answer
is chat.answering's, built on the row functions here."""

import uuid

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext as _

from llm.engine import CANCELLED, Turn
from chat.models import Citation, Conversation, Message
from knowledge.models import QAPair
from training.models import AdapterVersion


class ChatError(Exception):
    """A refusal to report to the client as an `error` frame / HTTP 4xx: `code` + message."""

    def __init__(self, code, detail):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def conversation_for(
    *, conversation_id=None, session_key="", user=None, channel=Conversation.Channel.WEB, new_id=None,
    rollout=Conversation.Rollout.NONE,
):
    """The caller's conversation by id, or a new one when the id is empty (with `new_id` as its id
    and `rollout` as its canary side when given: chat.canary chose them)."""
    if not conversation_id:
        return Conversation.objects.create(
            **({"id": new_id} if new_id else {}), rollout=rollout,
            channel=channel, session_key=session_key, user=user if user is not None and user.is_authenticated else None,
        )
    conversation = Conversation.objects.filter(pk=conversation_id).first() if is_uuid(conversation_id) else None
    if conversation is None or not conversation.belongs_to(session_key=session_key, user=user):
        # The same answer for "absent" and "someone else's": ids are not to be probed.
        raise ChatError("not_found", _("No such conversation."))
    return conversation


def is_uuid(value):
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def check_message_text(text):
    if not isinstance(text, str) or not text.strip():
        raise ChatError("invalid", _("The message text is empty."))
    if "\x00" in text:  # PostgreSQL stores no NUL characters; no customer types one
        raise ChatError("invalid", _("The message contains a NUL character."))
    if len(text) > settings.CSP_CHAT_MAX_MESSAGE_CHARS:
        raise ChatError(
            "too_long",
            _("The message is %(size)s characters; the limit is %(max)s.")
            % {"size": len(text), "max": settings.CSP_CHAT_MAX_MESSAGE_CHARS},
        )
    return text.strip()


def message_add_question(*, conversation, text):
    """Store the customer's message and return (history turns for the engine, the question row)."""
    question = Message.objects.create(conversation=conversation, role=Message.Role.USER, text=text)
    if not conversation.title:
        conversation.title = text[:200]
        conversation.save(update_fields=["title", "updated_at"])
    recent = list(
        conversation.messages.exclude(role=Message.Role.ASSISTANT, text="")
        .order_by("-created_at", "-id")[: settings.CSP_CHAT_HISTORY_MESSAGES]
    )
    history = [Turn("user" if m.role == Message.Role.USER else "assistant", m.text) for m in reversed(recent)]
    return history, question


def conversation_record(*, turns, user, channel, new_id=None, rollout=Conversation.Rollout.NONE):
    """A stateless client's whole conversation (the OpenAI API sends it with every request), stored
    as a new conversation of its own: its turns, titled by the last question."""
    conversation = Conversation.objects.create(
        **({"id": new_id} if new_id else {}), rollout=rollout, channel=channel, user=user, title=turns[-1].text.strip()[:200]
    )
    Message.objects.bulk_create(Message(conversation=conversation, role=turn.role, text=turn.text.strip()) for turn in turns)
    return conversation


def message_start_answer(*, conversation, adapter_name, mode="", sources=()):
    answer = Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        adapter_name=adapter_name or "",
        adapter_version=AdapterVersion.objects.filter(name=adapter_name).first() if adapter_name else None,
        mode=mode,
        sources=list(sources),
    )
    if sources:
        # A pair deleted since the index was built is cited without its row (pair null).
        existing = set(QAPair.objects.filter(pk__in=[s["pair"] for s in sources]).values_list("pk", flat=True))
        Citation.objects.bulk_create(
            Citation(message=answer, pair_id=s["pair"] if s["pair"] in existing else None, rank=s["rank"], score=s["score"])
            for s in sources
        )
    return answer


def conversation_started_on(*, conversation, version):
    """Record the version a new conversation started on: its first answer's (None: the base model)."""
    conversation.adapter_version = version
    conversation.save(update_fields=["adapter_version"])


def message_finish_answer(*, answer, text, stats, mode=None, sources=None, used=None):
    """Store how an answer ended; mode/sources/used (chat.grounding) when it was grounded."""
    fields = ["text", "tokens", "latency_ms", "first_token_ms", "finish_reason"]
    for name, value in (("mode", mode), ("sources", sources), ("used", used)):
        if value is not None:
            setattr(answer, name, value)
            fields.append(name)
    # A model can emit the byte 0x00 (the random tiny test model does); PostgreSQL refuses NUL in
    # text, so it is dropped here, where every answer is stored, rather than lose the whole answer.
    answer.text = text.replace("\x00", "")
    answer.tokens = stats.tokens
    answer.latency_ms = round(stats.latency_ms) if stats.latency_ms is not None else None
    answer.first_token_ms = round(stats.first_token_ms) if stats.first_token_ms is not None else None
    # No reason yet: the caller stopped waiting for a request it cancelled (a client that left
    # while the decode thread was busy); it ends as cancelled, never as an unfinished row.
    answer.finish_reason = stats.finish_reason or CANCELLED
    answer.save(update_fields=fields)
    if used:
        Citation.objects.filter(message=answer, pair_id__in=used).update(used=True)
    Conversation.objects.filter(pk=answer.conversation_id).update(updated_at=timezone.now())


def message_rate(*, message_id, rating, comment="", session_key="", user=None):
    """Record 👍 (1) / 👎 (-1) on an answer of the caller's own conversation."""
    if rating not in (1, -1) or isinstance(rating, bool):
        raise ChatError("invalid", _("rating must be 1 or -1."))
    if not isinstance(comment, str) or len(comment) > 2000:
        raise ChatError("invalid", _("The comment must be text of at most 2000 characters."))
    answer = (
        Message.objects.select_related("conversation").filter(pk=message_id, role=Message.Role.ASSISTANT).first()
        if isinstance(message_id, int) or (isinstance(message_id, str) and message_id.isdecimal())
        else None
    )
    if answer is None or not answer.conversation.belongs_to(session_key=session_key, user=user):
        raise ChatError("not_found", _("No such answer."))
    answer.rating = rating
    answer.feedback_comment = comment.strip()
    answer.save(update_fields=["rating", "feedback_comment"])
    return answer
