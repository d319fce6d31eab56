from django import forms
from django.conf import settings
from django.contrib.admin import helpers
from django.utils.text import format_lazy
from django.utils.translation import gettext_lazy as _

from knowledge.formats import FORMATS
from knowledge.models import ALTERNATE_SEPARATOR, ALTERNATES_MAX, Category, QAPair

KEEP = ""


class AlternatesField(forms.CharField):
    """A pair's alternate questions as a textarea, one per line; blank lines are ignored.

    Only the shape changes here: each alternate is checked by the model (QAPair.clean), as the
    API's and the importers' are, and its messages land on this field.
    """

    widget = forms.Textarea(attrs={"rows": 4})

    def prepare_value(self, value):
        return "\n".join(value) if isinstance(value, list) else value

    def to_python(self, value):
        return [line.strip() for line in (value or "").splitlines() if line.strip()]

    def has_changed(self, initial, data):
        return (initial or []) != self.to_python(data)


class QAPairForm(forms.ModelForm):
    alternates = AlternatesField(
        label=_("Alternate questions"),
        required=False,
        help_text=format_lazy(
            _(
                "Other ways customers ask the same question (相似问法), one per line, at most {count}. Each must "
                "differ (ignoring width, case and punctuation) from this question and from every other pair's "
                "question and alternates, and cannot contain {sep}. Retrieval matches them like the question."
            ),
            count=ALTERNATES_MAX,
            sep=ALTERNATE_SEPARATOR,
        ),
    )

    class Meta:
        model = QAPair
        fields = "__all__"


class ImportForm(forms.Form):
    file = forms.FileField(
        label=_("File"),
        help_text=_(
            "JSON (a list like data/train.json), JSONL (one object per line) or CSV with a header row. "
            "Fields: instruction, input, output; optional alternates (a list; in CSV one cell, separated by "
            "\" || \"), category, split, status, id."
        ),
    )
    file_format = forms.ChoiceField(
        label=_("Format"),
        required=False,
        choices=[(KEEP, _("From the file name"))] + [(name, name.upper()) for name in FORMATS],
    )
    status = forms.ChoiceField(
        label=_("Status"),
        required=False,
        choices=[(KEEP, _("From the file (new pairs: draft)"))] + QAPair.Status.choices,
        help_text=_("Applied to every imported pair."),
    )
    split = forms.ChoiceField(
        label=_("Split"),
        required=False,
        choices=[(KEEP, _("From the file (new pairs: automatic)"))] + QAPair.Split.choices,
    )
    dry_run = forms.BooleanField(
        label=_("Dry run"), required=False, help_text=_("Check the file and show the report without saving anything.")
    )

    def clean_file(self):
        upload = self.cleaned_data["file"]
        if upload.size > settings.CSP_IMPORT_MAX_BYTES:
            raise forms.ValidationError(
                _("The file is %(size)s bytes; the limit is %(max)s."),
                params={"size": upload.size, "max": settings.CSP_IMPORT_MAX_BYTES},
            )
        return upload


class MoveToCategoryForm(forms.Form):
    _selected_action = forms.CharField(widget=forms.MultipleHiddenInput)
    action = forms.CharField(widget=forms.HiddenInput, initial="move_to_category")
    select_across = forms.CharField(widget=forms.HiddenInput, required=False)
    category = forms.ModelChoiceField(label=_("Category"), queryset=Category.objects.all())

    def __init__(self, *args, selected=(), select_across="0", **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["_selected_action"].initial = list(selected)
        self.fields["select_across"].initial = select_across
        self.action_checkbox_name = helpers.ACTION_CHECKBOX_NAME

