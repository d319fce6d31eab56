"""Serializer fields shared by the apps' APIs."""

from django.utils.translation import gettext_lazy as _
from rest_framework import serializers


class TextField(serializers.CharField):
    """A CharField that refuses numbers: DRF's turns 0 into "0", and a question is never a number."""

    default_error_messages = {"not_text": _("Must be text, not {type}.")}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_text", type=type(data).__name__)
        return super().to_internal_value(data)


class NumberField(serializers.FloatField):
    """A JSON number, nothing else: DRF's FloatField also takes true, false and "1.5"."""

    default_error_messages = {"not_number": _("Must be a number, not {type}.")}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("not_number", type=type(data).__name__)
        return super().to_internal_value(data)


class WholeNumberField(serializers.IntegerField):
    """A JSON integer, nothing else (not true, not "3", not 2.5)."""

    default_error_messages = {"not_integer": _("Must be a whole number, not {type}.")}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("not_integer", type=type(data).__name__)
        return super().to_internal_value(data)
