import uuid

from django.conf import settings
from django.db import models
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class Conversation(models.Model):
    class State(models.TextChoices):
        BOT = "bot", _("Answered by the assistant")
        WAITING = "waiting", _("Waiting for an agent")
        AGENT = "agent", _("With an agent")
        CLOSED = "closed", _("Closed")

    class Channel(models.TextChoices):
        WEB = "web", _("Web chat")
        API = "api", _("REST API")
        OPENAI = "openai", _("OpenAI-compatible API")

    class Rollout(models.TextChoices):
        """Which side of a canary rollout (training.canary) the conversation started on. One started
        during a canary stays on its version (chat.canary); one started without follows the active one."""

        NONE = "", _("No canary: follows the active version")
        ACTIVE = "active", _("Canary running: stays on the active version it started with")
        CANARY = "canary", _("Canary: stays on the canary version")

    # A UUID, not a counter: a client names its conversation, and must not guess another's.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    channel = models.CharField(_("channel"), max_length=10, choices=Channel.choices, default=Channel.WEB)
    session_key = models.CharField(_("session"), max_length=64, blank=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("user"), null=True, blank=True, on_delete=models.SET_NULL
    )
    title = models.CharField(_("title"), max_length=200, blank=True)
    # Human handoff, one state machine (chat.handoff): bot → waiting → agent → closed.
    state = models.CharField(_("state"), max_length=10, choices=State.choices, default=State.BOT, db_index=True)
    agent = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("agent"), null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+", help_text=_("The staff member who took the conversation over."),
    )
    handoff_requested_at = models.DateTimeField(_("person asked for at"), null=True, blank=True)
    closed_at = models.DateTimeField(_("closed at"), null=True, blank=True)
    adapter_version = models.ForeignKey(
        "training.AdapterVersion", verbose_name=_("started on version"), null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+", help_text=_("The adapter version that answered its first message; empty: the base model."),
    )
    rollout = models.CharField(_("canary rollout"), max_length=10, choices=Rollout.choices, default=Rollout.NONE, blank=True)
    csat = models.PositiveSmallIntegerField(
        _("satisfaction (1-5)"), null=True, blank=True, help_text=_("The customer's rating of the conversation after it closed.")
    )
    created_at = models.DateTimeField(_("started at"), auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(_("last message at"), auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        verbose_name = _("conversation")
        verbose_name_plural = _("conversations")

    def __str__(self):
        return self.title or str(self.id)

    def belongs_to(self, *, session_key="", user=None):
        """Whether the caller (a browser session or an authenticated user) owns this conversation."""
        if user is not None and user.is_authenticated:
            return self.user_id == user.pk
        return bool(session_key) and self.user_id is None and self.session_key == session_key


class ReviewStatus(models.TextChoices):
    PENDING = "", _("Waiting for review")
    DRAFTED = "drafted", _("Turned into a draft Q&A pair")
    DISMISSED = "dismissed", _("Dismissed")


class Message(models.Model):
    ReviewStatus = ReviewStatus

    class Role(models.TextChoices):
        USER = "user", _("Customer")
        ASSISTANT = "assistant", _("Assistant")
        AGENT = "agent", _("Agent (staff)")

    class FinishReason(models.TextChoices):
        """How an answer ended: the engine's reasons (llm.engine.FINISH_REASONS), and "interrupted",
        which only the database knows: the process streaming it died (chat.answering). Empty: a
        customer's or an agent's message, or an answer still being streamed."""

        STOP = "stop", _("Complete")
        LENGTH = "length", _("Cut at the length limit")
        TIMEOUT = "timeout", _("Cut at the time limit")
        CANCELLED = "cancelled", _("Stopped (the client left or cancelled)")
        ERROR = "error", _("The model failed")
        FILTERED = "filtered", _("Stopped by the leak guard")
        INTERRUPTED = "interrupted", _("Interrupted (the server stopped mid-answer)")
        CORRECTED = "corrected", _("Replaced by the curated answer (the fact guard found an unsupported fact)")
        FALLBACK = "fallback", _("Replaced by the fallback reply (no answer in the knowledge base)")

    class Mode(models.TextChoices):
        CURATED = "curated", _("Curated answer, verbatim")
        GROUNDED = "grounded", _("Generated from the retrieved pairs")
        FALLBACK = "fallback", _("Fallback reply (offers a person)")

    conversation = models.ForeignKey(Conversation, verbose_name=_("conversation"), on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(_("role"), max_length=10, choices=Role.choices)
    text = models.TextField(_("text"), blank=True)
    adapter_version = models.ForeignKey(
        "training.AdapterVersion", verbose_name=_("adapter version"), null=True, blank=True, on_delete=models.SET_NULL
    )
    sent_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("sent by"), null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+", help_text=_("The staff member who wrote an agent reply."),
    )
    adapter_name = models.CharField(_("adapter"), max_length=50, blank=True, help_text=_("Empty: the base model."))
    latency_ms = models.PositiveIntegerField(_("response time (ms)"), null=True, blank=True)
    first_token_ms = models.PositiveIntegerField(_("first token (ms)"), null=True, blank=True)
    tokens = models.PositiveIntegerField(_("tokens"), null=True, blank=True)
    finish_reason = models.CharField(_("finish reason"), max_length=20, choices=FinishReason.choices, blank=True)
    mode = models.CharField(
        _("answer mode"), max_length=10, choices=Mode.choices, blank=True,
        help_text=_("How the answer was made from the knowledge base; empty: before grounding, or grounding is off."),
    )
    sources = models.JSONField(
        _("retrieved pairs"), default=list, blank=True,
        help_text=_("The approved Q&A pairs retrieved for the question: pair id, rank and similarity score."),
    )
    used = models.JSONField(
        _("pairs used"), default=list, blank=True, help_text=_("Ids of the retrieved pairs the answer drew on (its citations)."),
    )
    # The heartbeat of an answer being streamed: its text is saved every CSP_ANSWER_SAVE_SECONDS,
    # and one left open without a save for long had its process die (chat.answering).
    saved_at = models.DateTimeField(
        _("last saved at"), default=timezone.now,
        help_text=_("While an answer is streamed its text so far is saved at an interval; this is the last save."),
    )
    rating = models.SmallIntegerField(_("rating"), null=True, blank=True, choices=[(1, "👍"), (-1, "👎")])
    feedback_comment = models.TextField(_("feedback comment"), blank=True, max_length=2000)
    # Curation: an answer rated 👎 or flagged by staff waits in the review queue until it is
    # turned into a draft Q&A pair or dismissed.
    flagged = models.BooleanField(
        _("flagged for review"), default=False, help_text=_("Staff flagged this answer for the review queue.")
    )
    review_status = models.CharField(
        _("review"), max_length=10, choices=ReviewStatus.choices, default=ReviewStatus.PENDING, blank=True
    )
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("reviewed by"), null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )
    reviewed_at = models.DateTimeField(_("reviewed at"), null=True, blank=True)
    draft_pairs = models.ManyToManyField(
        "knowledge.QAPair",
        through="DraftedPair",
        verbose_name=_("draft pairs"),
        related_name="drafted_from",
        blank=True,
        help_text=_("Q&A pairs drafted from this answer (or from this staff reply in a handoff)."),
    )
    created_at = models.DateTimeField(_("created at"), auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        indexes = [
            # The reconciler's query, every minute: the open answers are a handful of rows among millions.
            models.Index(fields=["saved_at"], condition=Q(role="assistant", finish_reason=""), name="chat_open_answers"),
        ]

    def __str__(self):
        text = self.text.replace("\n", " ")
        return text if len(text) <= 60 else f"{text[:59]}…"

    def question(self):
        """For an answer: the customer's message it answers (the latest one before it), or None."""
        return (
            Message.objects.filter(conversation_id=self.conversation_id, role=Message.Role.USER, id__lt=self.id)
            .order_by("-id")
            .first()
        )

    @staticmethod
    def question_text():
        """`question()`'s text as a query expression, to annotate many answers in one query."""
        return Subquery(
            Message.objects.filter(conversation=OuterRef("conversation"), role=Message.Role.USER, id__lt=OuterRef("id"))
            .order_by("-id")
            .values("text")[:1]
        )


class Citation(models.Model):
    """A pair retrieved for an answer's question (chat.grounding), kept for the pair's lineage: which
    answers it grounded. The answer row itself keeps the same list as it was sent (`sources`,
    `used`); these rows are its index by pair. Deleting the pair keeps the answer's record."""

    message = models.ForeignKey(Message, verbose_name=_("answer"), on_delete=models.CASCADE, related_name="citations")
    pair = models.ForeignKey(
        "knowledge.QAPair", verbose_name=_("Q&A pair"), null=True, on_delete=models.SET_NULL, related_name="+"
    )
    rank = models.PositiveSmallIntegerField(_("rank"))
    score = models.FloatField(_("score"))
    used = models.BooleanField(_("used"), default=False, help_text=_("The answer drew on this pair."))

    class Meta:
        verbose_name = _("citation")
        verbose_name_plural = _("citations")
        ordering = ("message", "rank")
        indexes = [models.Index(fields=["pair", "used"], name="chat_citation_pair_used")]

    def __str__(self):
        return f"#{self.message_id} → #{self.pair_id} ({self.rank})"


class DraftedPair(models.Model):
    """A Q&A pair drafted from a chat message: the review queue's answer, or a staff reply.

    The link lives in chat, not on the pair, because the knowledge base sits below chat and
    knows nothing of conversations. A pair comes from at most one message (one-to-one); a
    message may be drafted into several pairs. Deleting either side drops the link only.
    """

    message = models.ForeignKey(Message, verbose_name=_("from answer"), on_delete=models.CASCADE, related_name="+")
    pair = models.OneToOneField(
        "knowledge.QAPair", verbose_name=_("Q&A pair"), on_delete=models.CASCADE, related_name="+"
    )

    class Meta:
        verbose_name = _("pair drafted from an answer")
        verbose_name_plural = _("pairs drafted from answers")

    def __str__(self):
        return f"#{self.pair_id} ← #{self.message_id}"


class ReviewQueueManager(models.Manager):
    def get_queryset(self):
        return (
            super()
            .get_queryset()
            .filter(role=Message.Role.ASSISTANT)
            .filter(models.Q(rating=-1) | models.Q(flagged=True))
        )


class ReviewItem(Message):
    """An answer rated 👎 or flagged by staff: the curation review queue (a proxy of Message)."""

    objects = ReviewQueueManager()

    class Meta:
        proxy = True
        ordering = ["-created_at", "-id"]
        verbose_name = _("answer to review")
        verbose_name_plural = _("review queue")
