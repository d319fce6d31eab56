"""REST representations of the knowledge base.

Validation of a Q&A pair is the model's own (`full_clean()`, which runs `QAPair.clean()`), so
the API refuses exactly what the admin refuses, with the same messages.
"""

from contextlib import contextmanager

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, models, transaction
from django.utils.text import format_lazy
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.fields import get_error_detail

from csplatform.api_fields import TextField
from knowledge import formats
from knowledge.models import ALTERNATE_MAX_LENGTH, ALTERNATE_SEPARATOR, ALTERNATES_MAX, Category, QAPair


class TextModelSerializer(serializers.ModelSerializer):
    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: TextField,
        models.TextField: TextField,
    }


class CategorySerializer(TextModelSerializer):
    pair_count = serializers.SerializerMethodField(help_text=_("How many Q&A pairs are in this category."))

    class Meta:
        model = Category
        fields = ["id", "name", "description", "pair_count"]

    def get_pair_count(self, category) -> int:
        # The view annotates its querysets; a category just created is not annotated.
        count = getattr(category, "pair_count", None)
        return category.pairs.count() if count is None else count


@extend_schema_field(
    {"type": "string", "nullable": True, "maxLength": Category._meta.get_field("name").max_length}
)
class CategoryNameField(serializers.SlugRelatedField):
    """A category by name. DRF reads "" as null for relations, as an export file writes "no
    category"; the schema says so (no minLength)."""


class AlternatesField(serializers.ListField):
    """A list of strings, as the schema says; its items are checked by the model (QAPair.clean)
    as the admin's are, so the errors are the admin's messages in one flat list (the API's error
    shape), not DRF's errors keyed by item index."""

    def to_internal_value(self, data):
        if isinstance(data, (str, dict)) or not isinstance(data, list):
            self.fail("not_a_list", input_type=type(data).__name__)
        return list(data)


class QAPairSerializer(TextModelSerializer):
    alternates = AlternatesField(
        child=TextField(),
        required=False,
        label=_("alternate questions"),
        help_text=format_lazy(
            _(
                "Other ways customers ask this question (相似问法): at most {count}, each at most {length} "
                "characters, not blank, without {sep}, none the same (ignoring width, case and punctuation) as "
                "this pair's question, another alternate, or any other pair's question or alternate."
            ),
            count=ALTERNATES_MAX,
            length=ALTERNATE_MAX_LENGTH,
            sep=ALTERNATE_SEPARATOR,
        ),
    )
    category = CategoryNameField(
        slug_field="name",
        queryset=Category.objects.all(),
        allow_null=True,
        required=False,
        label=_("category"),
        help_text=_("The category's name; null (or empty) for none."),
        error_messages={"does_not_exist": _("There is no category named {value}; create it first.")},
    )
    created_by = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        label=_("created by"),
        help_text=_("Username; null when unknown (imported from the command line, or the user was deleted)."),
    )
    updated_by = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        label=_("updated by"),
        help_text=_("Username; null when unknown."),
    )

    class Meta:
        model = QAPair
        fields = [
            "id",
            "instruction",
            "input",
            "output",
            "alternates",
            "category",
            "status",
            "split",
            "source",
            "question_hash",
            "created_at",
            "updated_at",
            "created_by",
            "updated_by",
        ]
        read_only_fields = ["source", "question_hash", "created_at", "updated_at"]
        # Blank text reaches the model's clean(), so the message is the admin's, not DRF's.
        extra_kwargs = {"instruction": {"allow_blank": True}, "output": {"allow_blank": True}}

    def validate(self, attrs):
        self._check_with_model(attrs)
        return attrs

    def create(self, validated_data):
        with self._raced_duplicate_refused(validated_data):
            return super().create(validated_data)

    def update(self, instance, validated_data):
        with self._raced_duplicate_refused(validated_data):
            return super().update(instance, validated_data)

    @contextmanager
    def _raced_duplicate_refused(self, attrs):
        try:
            with transaction.atomic():
                yield
        except IntegrityError:
            # Another request stored the same question since validate(): say so as validate() does.
            self._check_with_model(attrs)
            raise

    def _check_with_model(self, attrs):
        """Run the model's validation (as the admin does) on the pair as it would be saved."""
        instance = self.instance or QAPair()
        # Check a copy, so a refused update leaves the instance as it was loaded.
        candidate = QAPair(**{f.attname: getattr(instance, f.attname) for f in QAPair._meta.concrete_fields})
        candidate._state.adding = instance._state.adding
        for name, value in attrs.items():
            setattr(candidate, name, value)
        # save() stores stripped text; check what will be stored.
        candidate.instruction = (candidate.instruction or "").strip()
        candidate.input = (candidate.input or "").strip()
        candidate.output = (candidate.output or "").strip()
        try:
            # full_clean() less its merge step, which would repeat "cannot be blank" from clean().
            # question_hash is computed by save(); its uniqueness is the duplicate check in clean().
            candidate.clean_fields(exclude=["question_hash", "created_by", "updated_by"])
            candidate.clean()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(get_error_detail(exc)) from None


class ImportRequestSerializer(serializers.Serializer):
    file = serializers.FileField(help_text=_("A JSON, JSONL or CSV file of Q&A pairs in the alpaca format."))
    format = serializers.ChoiceField(
        choices=formats.FORMATS,
        required=False,
        help_text=_("The file's format; by default it is read from the file name's suffix."),
    )
    status = serializers.ChoiceField(
        choices=QAPair.Status.choices,
        required=False,
        help_text=_("Give every imported pair this status (overrides the file's status column)."),
    )
    split = serializers.ChoiceField(
        choices=QAPair.Split.choices,
        required=False,
        help_text=_("Give every imported pair this split (overrides the file's split column)."),
    )
    dry_run = serializers.BooleanField(
        required=False, default=False, help_text=_("Check the file and report, but write nothing.")
    )

    def validate_file(self, upload):
        # Refuse before the upload is read into memory; the service checks the bytes it gets too.
        if upload.size > settings.CSP_IMPORT_MAX_BYTES:
            raise serializers.ValidationError(
                _("The file is %(size)s bytes; the limit is %(max)s.")
                % {"size": upload.size, "max": settings.CSP_IMPORT_MAX_BYTES}
            )
        return upload


class AlternateAddSerializer(serializers.Serializer):
    question = TextField(
        max_length=ALTERNATE_MAX_LENGTH,
        help_text=_(
            "A customer's question, as they typed it, to add to the pair's alternate questions. Nothing "
            "changes when the pair already asks it; refused when another pair does."
        ),
    )


class ImportRowSerializer(serializers.Serializer):
    row = serializers.IntegerField()
    action = serializers.ChoiceField(choices=["created", "updated", "skipped", "rejected"])
    instruction = serializers.CharField()
    pair_id = serializers.IntegerField(allow_null=True)
    reason = serializers.CharField()
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text=_("Field name -> messages; `row` when the row as a whole cannot be read."),
    )
    warnings = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text=_("Field name -> messages about a row that was still imported (e.g. a CSV cell that starts like a spreadsheet formula)."),
    )


class ImportCountsSerializer(serializers.Serializer):
    created = serializers.IntegerField()
    updated = serializers.IntegerField()
    skipped = serializers.IntegerField()
    rejected = serializers.IntegerField()


class ImportReportSerializer(serializers.Serializer):
    """The shape of `services.ImportReport.as_dict()`; used for the schema only."""

    filename = serializers.CharField()
    format = serializers.CharField(help_text=_("json, jsonl or csv; empty when it could not be told."))
    ok = serializers.BooleanField()
    committed = serializers.BooleanField()
    dry_run = serializers.BooleanField()
    file_error = serializers.CharField(help_text=_("Why the file as a whole was refused; empty when it was read."))
    counts = ImportCountsSerializer()
    rows = ImportRowSerializer(many=True)


class ExportRecordSerializer(serializers.Serializer):
    """One record of a JSON export (a JSONL export has one per line); used for the schema only."""

    instruction = serializers.CharField()
    input = serializers.CharField(allow_blank=True)
    output = serializers.CharField()
    alternates = serializers.ListField(
        child=serializers.CharField(), help_text=_("Alternate questions (相似问法); a CSV export joins them with \" || \".")
    )
    category = serializers.CharField(allow_blank=True, help_text=_("The category's name; empty for none."))
    split = serializers.ChoiceField(choices=QAPair.Split.choices)
    status = serializers.ChoiceField(choices=QAPair.Status.choices)
    id = serializers.IntegerField()


class ExportQuerySerializer(serializers.Serializer):
    file_format = serializers.ChoiceField(choices=formats.FORMATS, default="json")
