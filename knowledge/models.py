import hashlib
import re
import unicodedata

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxLengthValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

from llm.prompting import question_text, render_training_example

INSTRUCTION_MAX_LENGTH = 2000
INPUT_MAX_LENGTH = 4000
OUTPUT_MAX_LENGTH = 8000

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
    return hashlib.sha256(normalise_question(instruction, input_text).encode()).hexdigest()


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
        if not errors:
            clash = QAPair.objects.filter(question_hash=question_hash(self.instruction, self.input)).exclude(pk=self.pk)
            existing = clash.first()
            if existing is not None:
                errors["instruction"] = ValidationError(
                    _("The same question is already stored as pair #%(id)s."),
                    code="duplicate",
                    params={"id": existing.pk},
                )
        if errors:
            raise ValidationError(errors)

    def save(self, *args, **kwargs):
        self.instruction = self.instruction.strip()
        self.input = (self.input or "").strip()
        self.output = self.output.strip()
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
            "category": self.category.name if self.category_id else "",
            "split": self.split,
            "status": self.status,
            "id": self.pk,
        }

