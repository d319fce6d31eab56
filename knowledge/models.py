import hashlib
import json
import re
import unicodedata

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxLengthValidator
from django.db import models
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from llm.prompting import question_text, render_training_example

INSTRUCTION_MAX_LENGTH = 2000
INPUT_MAX_LENGTH = 4000
OUTPUT_MAX_LENGTH = 8000
# Alternate questions (相似问法) per pair: each is a question, so it has the question's limit.
ALTERNATE_MAX_LENGTH = INSTRUCTION_MAX_LENGTH
ALTERNATES_MAX = 50
# A CSV cell holds a pair's alternates joined by " || " (knowledge.formats); an alternate that
# contains the separator is refused everywhere, so no escaping is needed and every format round-trips.
ALTERNATE_SEPARATOR = "||"

_PUNCTUATION_AND_SPACE = re.compile(r"[\s\W_]+", re.UNICODE)
# The seed's questions read "用户问：如何退货？"; the prefix says nothing about the question.
_QUESTION_PREFIX = re.compile(r"^(用户问|客户问|问)[:：]\s*")


def normalise_question(instruction, input_text=""):
    """Fold width, case, punctuation and whitespace, so trivially different copies of one
    question compare equal ("如何退货？" == "如何 退货" == "用户问：如何退货")."""
    text = unicodedata.normalize("NFKC", question_text(instruction, input_text)).casefold()
    text = _QUESTION_PREFIX.sub("", text)
    return _PUNCTUATION_AND_SPACE.sub("", text)


def question_hash(instruction, input_text=""):
    return _key_hash(normalise_question(instruction, input_text))


def _key_hash(key):
    return hashlib.sha256(key.encode()).hexdigest()


def clean_alternates(value, *, question_key=""):
    """The checks on a pair's alternate questions that need nothing but the pair: (the alternates
    stripped, messages). question_key: the pair's own question, normalised (normalise_question).

    The admin form, the REST serializer (both through QAPair.clean) and the importers call this
    and question_owners, so an alternate is refused the same way, with the same message, wherever
    it comes from.
    """
    if value in (None, ""):
        return [], []
    if not isinstance(value, list):
        return [], [gettext("Must be a list of questions, not %(type)s.") % {"type": type(value).__name__}]
    cleaned, messages, seen = [], [], {}
    if len(value) > ALTERNATES_MAX:
        messages.append(gettext("At most %(max)s alternate questions (this has %(len)s).") % {"max": ALTERNATES_MAX, "len": len(value)})
    for number, text in enumerate(value, start=1):
        if not isinstance(text, str):
            messages.append(gettext("Alternate %(n)s must be text, not %(type)s.") % {"n": number, "type": type(text).__name__})
            continue
        text = text.strip()
        key = normalise_question(text)
        if not key:
            messages.append(gettext("Alternate %(n)s is empty (it needs at least one letter or digit).") % {"n": number})
        elif len(text) > ALTERNATE_MAX_LENGTH:
            messages.append(
                gettext("Alternate %(n)s has %(len)s characters; at most %(max)s.")
                % {"n": number, "len": len(text), "max": ALTERNATE_MAX_LENGTH}
            )
        elif ALTERNATE_SEPARATOR in text or "\x00" in text:
            messages.append(
                gettext("Alternate %(n)s contains %(sep)s or a NUL character, which an alternate cannot hold.")
                % {"n": number, "sep": ALTERNATE_SEPARATOR}
            )
        elif key == question_key:
            messages.append(gettext("Alternate %(n)s “%(text)s” is the pair's own question.") % {"n": number, "text": text})
        elif key in seen:
            messages.append(
                gettext("Alternate %(n)s “%(text)s” repeats alternate %(first)s.") % {"n": number, "text": text, "first": seen[key]}
            )
        else:
            seen[key] = number
        cleaned.append(text)
    return cleaned, messages


def question_owners(keys, *, exclude=()):
    """Which other pairs already ask these questions: {normalised question: (pair id, "question"
    or "alternate")}, over every stored pair but those in `exclude`.

    Questions are found by their indexed hash; alternates by reading every pair that has any
    (normalised here, as the hash normalises): no index can fold width, case and punctuation.
    """
    keys, exclude = set(keys), set(exclude)  # excluded here, not in SQL: an import may exclude 20 000
    by_hash = {_key_hash(key): key for key in keys}
    owners = {}
    hashes = list(by_hash)
    for start in range(0, len(hashes), 500):  # SQLite caps the parameters of one query
        stored = QAPair.objects.filter(question_hash__in=hashes[start : start + 500])
        for pk, digest in stored.values_list("pk", "question_hash"):
            if pk not in exclude:
                owners[by_hash[digest]] = (pk, "question")
    for pk, alternates in QAPair.objects.exclude(alternates=[]).values_list("pk", "alternates"):
        if pk in exclude:
            continue
        for text in alternates:
            key = normalise_question(text)
            if key in keys:
                owners.setdefault(key, (pk, "alternate"))
    return owners


def owner_message(text, owner):
    """The message for a question (or alternate) that another pair already asks."""
    pk, kind = owner
    if kind == "question":
        return gettext("“%(text)s” is already the question of pair #%(id)s.") % {"text": text, "id": pk}
    if kind == "alternate":
        return gettext("“%(text)s” is already an alternate question of pair #%(id)s.") % {"text": text, "id": pk}
    return gettext("“%(text)s” is also asked by row %(row)s of this file.") % {"text": text, "row": pk}


class ReadableJSONEncoder(json.JSONEncoder):
    """JSON with Chinese as itself, not \\u escapes: SQLite stores JSON as text, and a search of
    the alternates (a LIKE over that text, in the admin and the API) must find 退款 in them."""

    def __init__(self, *args, **kwargs):
        kwargs["ensure_ascii"] = False
        super().__init__(*args, **kwargs)


class Category(models.Model):
    name = models.CharField(_("name"), max_length=100, unique=True)
    description = models.TextField(_("description"), blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = _("category")
        verbose_name_plural = _("categories")

    def __str__(self):
        return self.name


class QAPair(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", _("Draft")
        APPROVED = "approved", _("Approved")
        ARCHIVED = "archived", _("Archived")

    class Split(models.TextChoices):
        AUTO = "auto", _("Automatic")
        TRAIN = "train", _("Train")
        DEV = "dev", _("Dev (evaluation)")

    class Source(models.TextChoices):
        MANUAL = "manual", _("Manual")
        IMPORT = "import", _("Import")
        FEEDBACK = "feedback", _("Customer feedback")
        HANDOFF = "handoff", _("Human handoff")

    instruction = models.TextField(
        _("question (instruction)"),
        max_length=INSTRUCTION_MAX_LENGTH,
        validators=[MaxLengthValidator(INSTRUCTION_MAX_LENGTH)],
        help_text=_("What the customer asks, e.g. 用户问：如何退货？"),
    )
    input = models.TextField(
        _("context (input)"),
        max_length=INPUT_MAX_LENGTH,
        validators=[MaxLengthValidator(INPUT_MAX_LENGTH)],
        blank=True,
        help_text=_("Optional extra context given with the question (alpaca's input field)."),
    )
    output = models.TextField(
        _("answer (output)"),
        max_length=OUTPUT_MAX_LENGTH,
        validators=[MaxLengthValidator(OUTPUT_MAX_LENGTH)],
        help_text=_("The answer the model should learn, with concrete facts (days, amounts, steps)."),
    )
    alternates = models.JSONField(
        _("alternate questions"),
        default=list,
        blank=True,
        encoder=ReadableJSONEncoder,
        help_text=_(
            "Other ways customers ask the same question (相似问法), e.g. 怎么退货 / 东西不想要了能退吗. "
            "Retrieval matches them like the question."
        ),
    )
    category = models.ForeignKey(
        Category, verbose_name=_("category"), null=True, blank=True, on_delete=models.SET_NULL, related_name="pairs"
    )
    status = models.CharField(_("status"), max_length=16, choices=Status.choices, default=Status.DRAFT, db_index=True)
    split = models.CharField(
        _("split"),
        max_length=8,
        choices=Split.choices,
        default=Split.AUTO,
        help_text=_("Automatic puts about one pair in ten into the dev set, deterministically."),
    )
    source = models.CharField(_("source"), max_length=16, choices=Source.choices, default=Source.MANUAL)
    question_hash = models.CharField(
        _("question hash"),
        max_length=64,
        unique=True,
        editable=False,
        help_text=_("SHA-256 of the normalised question; the same question is stored once."),
    )
    created_at = models.DateTimeField(_("created at"), auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(_("updated at"), auto_now=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("created by"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("updated by"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )

    class Meta:
        ordering = ["-updated_at", "-id"]
        verbose_name = _("Q&A pair")
        verbose_name_plural = _("Q&A pairs")

    def __str__(self):
        text = self.instruction.strip().replace("\n", " ")
        return text if len(text) <= 60 else f"{text[:59]}…"

    def clean(self):
        errors = {}
        for field in ("instruction", "output"):
            if not (getattr(self, field) or "").strip():
                errors[field] = ValidationError(_("This field cannot be blank."), code="blank")
        if "instruction" not in errors and not normalise_question(self.instruction, self.input):
            errors["instruction"] = ValidationError(
                _("The question must contain at least one letter or digit."), code="no_text"
            )
        key = normalise_question(self.instruction or "", self.input)
        alternates, messages = clean_alternates(self.alternates, question_key=key)
        if not messages:
            self.alternates = alternates
        if not errors:
            owners = question_owners([key, *map(normalise_question, alternates)], exclude=[self.pk] if self.pk else [])
            owner = owners.pop(key, None)
            if owner is not None and owner[1] == "question":
                errors["instruction"] = ValidationError(
                    _("The same question is already stored as pair #%(id)s."),
                    code="duplicate",
                    params={"id": owner[0]},
                )
            elif owner is not None:
                errors["instruction"] = ValidationError(
                    _("The same question is already an alternate question of pair #%(id)s."),
                    code="duplicate",
                    params={"id": owner[0]},
                )
            if not messages:
                messages = [owner_message(text, owners[normalise_question(text)]) for text in alternates if normalise_question(text) in owners]
        if messages:
            errors["alternates"] = ValidationError(messages, code="invalid")
        if errors:
            raise ValidationError(errors)

    def save(self, *args, **kwargs):
        self.instruction = self.instruction.strip()
        self.input = (self.input or "").strip()
        self.output = self.output.strip()
        self.alternates = [text.strip() if isinstance(text, str) else text for text in self.alternates or []]
        self.question_hash = question_hash(self.instruction, self.input)
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and {"instruction", "input"} & set(update_fields):
            kwargs["update_fields"] = {*update_fields, "question_hash"}
        super().save(*args, **kwargs)

    def training_text(self, *, system=""):
        """The exact text this pair is trained on (prompt + answer)."""
        prompt, completion = render_training_example(self.instruction, self.input, self.output, system=system)
        return prompt + completion

    def as_record(self):
        """The seed's alpaca record, with the extra keys export writes."""
        return {
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "alternates": list(self.alternates),
            "category": self.category.name if self.category_id else "",
            "split": self.split,
            "status": self.status,
            "id": self.pk,
        }



class Embedding(models.Model):
    """One text's dense embedding, cached by content (knowledge.retrieval.DatabaseEmbeddingCache).

    The key is the embedder's own digest of (model, kind, text), so an approval embeds only the
    texts no process has embedded before, and every process (web, workers, several daphnes)
    shares the vectors instead of re-embedding the knowledge base at start.
    """

    key = models.CharField(_("key"), max_length=64, primary_key=True)
    model = models.CharField(_("embedding model"), max_length=200)
    vector = models.BinaryField(_("vector"), help_text=_("float32, little-endian"))
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        verbose_name = _("embedding")
        verbose_name_plural = _("embeddings")

    def __str__(self):
        return f"{self.model} {self.key[:12]}"
