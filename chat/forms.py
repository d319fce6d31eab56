from django import forms
from django.utils.translation import gettext_lazy as _

from knowledge.models import Category


class DraftFromAnswerForm(forms.Form):
    """A reviewer's correction of a chat answer, saved as a draft Q&A pair."""

    instruction = forms.CharField(
        label=_("Question"),
        widget=forms.Textarea(attrs={"rows": 2, "cols": 80}),
        help_text=_("The customer's question as the model should learn it; edit it into a clean question."),
    )
    input = forms.CharField(label=_("Context (input)"), required=False, widget=forms.Textarea(attrs={"rows": 2, "cols": 80}))
    output = forms.CharField(
        label=_("Corrected answer"),
        widget=forms.Textarea(attrs={"rows": 6, "cols": 80}),
        help_text=_("What the assistant should have answered, with the concrete facts. It starts as the model's answer."),
    )
    category = forms.ModelChoiceField(label=_("Category"), queryset=Category.objects.all(), required=False)
