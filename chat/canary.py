"""Which version answers a conversation while a canary rollout runs (training.canary).

A new conversation is given its id before its first answer is planned, and the id decides its
side once: `bucket(id)` (0-99, from a hash of the id) below the canary's per cent sends it to the
canary, else to the active version. From then on every answer of the conversation pins the
version it started with (the engine's `adapter=` pin: the process's engine, an inference worker,
llama.cpp and an OpenAI-compatible server each serve a pinned version beside the active one), so
a promote, a stop or a rollback never moves a conversation that is under way; the conversation
records its side (`rollout`) and version for the analytics' split (`chat.analytics.rollout_report`).

A conversation started with no canary running is on neither side: it follows the active version,
as always. A caller that pins a version itself (staff naming one on the OpenAI API) is left alone.
A stateless client (the OpenAI API) starts a new conversation with every request, so each of its
requests is assigned afresh.
"""

import hashlib
import uuid
from dataclasses import dataclass, field

from chat.models import Conversation
from chat.services import is_uuid
from training.models import AdapterVersion

BUCKETS = 100  # one per per cent


def bucket(conversation_id):
    """The conversation's bucket, 0-99: the same for the same id in every process."""
    digest = hashlib.sha256(str(conversation_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Route:
    """How a message is answered: `pin` (engine options naming the version, {} for the active one)
    and, when the message starts a conversation, that conversation's id and side."""

    pin: dict = field(default_factory=dict)
    new_id: uuid.UUID | None = None
    rollout: str = Conversation.Rollout.NONE


def pinned(version):
    return {"adapter": version.name, "adapter_path": version.path}


def side_of(conversation_id):
    """(rollout side, version) for a conversation starting now with this id."""
    canary = AdapterVersion.objects.filter(is_canary=True).first()
    if canary is None:
        return Conversation.Rollout.NONE, None
    if bucket(conversation_id) < canary.canary_percent:
        return Conversation.Rollout.CANARY, canary
    return Conversation.Rollout.ACTIVE, AdapterVersion.objects.filter(is_active=True).first()


def route(*, conversation_id=None, session_key="", user=None, options=None):
    """The Route of a message: of a new conversation when `conversation_id` is empty, else of the
    caller's conversation (a foreign or unknown id gets no pin: answer_start refuses it). Sync."""
    if not conversation_id:
        new_id = uuid.uuid4()
        if "adapter" in (options or {}):
            return Route(new_id=new_id)
        rollout, version = side_of(new_id)
        return Route(pin=pinned(version) if version is not None else {}, new_id=new_id, rollout=rollout)
    if "adapter" in (options or {}) or not is_uuid(conversation_id):
        return Route()
    conversation = Conversation.objects.select_related("adapter_version").filter(pk=conversation_id).first()
    if conversation is None or not conversation.belongs_to(session_key=session_key, user=user):
        return Route()
    if conversation.rollout and conversation.adapter_version is not None:
        return Route(pin=pinned(conversation.adapter_version))
    return Route()
