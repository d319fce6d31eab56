"""Texts the system saves for staff to read later, in every language a page may be shown in.

A background task or a management command speaks the server's language (settings.LANGUAGE_CODE),
but the text it saves (a scheduled run's activation decision, a failed run's reason) is read on a
page in the language of that page's request. So such a text is rendered at save time once per
language of settings.LANGUAGES and shown in the language of whoever reads it:

    run.error = stored(lambda: _("The disk is full ... (%(dir)s).") % {"dir": path})
    run.save(update_fields=["error"])
    ...
    shown(run.error)          # in the active language (the request's, on a page or in the API)
    shown(run.error, "en")    # in English (the run log, which is English throughout)

The render is a callable (or a lazy string) so that every `_()` inside it, and the `%` around
it, runs again under each language. A StoredTextField column holds the texts as a JSON object
{"en": ..., "zh-hans": ...}; a plain string (a row saved before, or a text that was never
translated) stays what it is and is shown as is. Loaded from the database, the field's value is a
StoredText: a str in the language active when it was loaded (code that reads it as a string keeps
working) that keeps every language's text, so saving the row again loses none.
"""

import json

from django.conf import settings
from django.db import models
from django.utils import translation


class StoredText(str):
    """A str in one language that carries the same text in the others (`texts`: language -> text)."""

    def __new__(cls, text, texts):
        self = super().__new__(cls, text)
        self.texts = dict(texts)
        return self

    def __reduce__(self):  # copy and pickle (a q2 task result) keep the texts
        return (StoredText, (str(self), self.texts))

    def as_json(self):
        return json.dumps(self.texts, ensure_ascii=False, sort_keys=True)


def _pick(texts, language):
    """The text in `language`, else in its base language ("en" for "en-us"), the server's, or any."""
    language = (language or settings.LANGUAGE_CODE).lower()
    base = language.split("-")[0]
    for candidate in (language, *(code for code in texts if code.split("-")[0] == base), settings.LANGUAGE_CODE):
        if candidate in texts:
            return texts[candidate]
    return next(iter(texts.values()), "")


def stored(render):
    """`render` (a callable returning text, or a lazy string) rendered in each of settings.LANGUAGES,
    as a StoredText in the active language."""
    texts = {}
    for code, _name in settings.LANGUAGES:
        with translation.override(code):
            texts[code] = str(render() if callable(render) else render)
    return StoredText(_pick(texts, translation.get_language()), texts)


def _parsed(value):
    """A StoredText from a column's JSON object of texts by language; any other string as it is."""
    if isinstance(value, StoredText) or not value.startswith("{"):
        return value
    try:
        texts = json.loads(value)
    except ValueError:
        return value
    codes = {code for code, _name in settings.LANGUAGES}
    if not texts or not isinstance(texts, dict) or not all(code in codes and isinstance(text, str) for code, text in texts.items()):
        return value
    return StoredText(_pick(texts, translation.get_language()), texts)


def shown(value, language=None):
    """A saved text in `language` (by default the active one: the request's). A plain string, a
    row saved before texts were stored by language, is shown as it is."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = _parsed(value)
    if not isinstance(value, StoredText):
        return value
    return _pick(value.texts, language or translation.get_language())


class StoredTextField(models.TextField):
    """A TextField holding a stored() text as JSON by language, or a plain string (kept as is)."""

    def from_db_value(self, value, expression, connection):
        return value if value is None else _parsed(value)

    def to_python(self, value):
        return _parsed(value) if isinstance(value, str) else super().to_python(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)  # TextField's: to_python()
        return value.as_json() if isinstance(value, StoredText) else value
