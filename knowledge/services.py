"""Workflows over Q&A pairs: import, export and bulk curation.

The admin, the REST API and the management commands call these and nothing else, so a file
imported any of the three ways gives the same report and the same rows.
"""

from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.translation import gettext as _

from knowledge import formats
from knowledge.models import (
    INPUT_MAX_LENGTH,
    INSTRUCTION_MAX_LENGTH,
    OUTPUT_MAX_LENGTH,
    Category,
    QAPair,
    clean_alternates,
    normalise_question,
    owner_message,
    question_hash,
    question_owners,
)


class RowAction:
    CREATED = "created"
    UPDATED = "updated"
    SKIPPED = "skipped"
    REJECTED = "rejected"


@dataclass
class RowResult:
    row: int
    action: str
    instruction: str = ""
    pair_id: int | None = None
    reason: str = ""
    errors: dict = field(default_factory=dict)  # field name -> list of messages
    # field name -> list of messages about a row that is imported all the same (a formula-like CSV cell)
    warnings: dict = field(default_factory=dict)

    def as_dict(self):
        return {
            "row": self.row,
            "action": self.action,
            "instruction": self.instruction,
            "pair_id": self.pair_id,
            "reason": self.reason,
            "errors": self.errors,
            "warnings": self.warnings,
        }


@dataclass
class ImportReport:
    filename: str
    file_format: str = ""
    rows: list = field(default_factory=list)
    file_error: str = ""
    committed: bool = False
    dry_run: bool = False

    def count(self, action):
        return sum(1 for row in self.rows if row.action == action)

    @property
    def counts(self):
        actions = (RowAction.CREATED, RowAction.UPDATED, RowAction.SKIPPED, RowAction.REJECTED)
        return {action: self.count(action) for action in actions}

    @property
    def ok(self):
        return not self.file_error and self.count(RowAction.REJECTED) == 0

    def as_dict(self):
        return {
            "filename": self.filename,
            "format": self.file_format,
            "ok": self.ok,
            "committed": self.committed,
            "dry_run": self.dry_run,
            "file_error": self.file_error,
            "counts": self.counts,
            "rows": [row.as_dict() for row in self.rows],
        }


@dataclass
class _Planned:
    result: RowResult
    values: dict
    pair: QAPair | None = None
    duplicate: bool = False  # the same pair as an earlier row of the file


def _text(data, key, max_length, errors, *, required=False):
    value = data.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        errors.setdefault(key, []).append(_("Must be text, not %(type)s.") % {"type": type(value).__name__})
        return ""
    value = value.strip()
    if required and not value:
        errors.setdefault(key, []).append(_("This field is required and cannot be blank."))
    if "\x00" in value:  # PostgreSQL stores no NUL characters: the row is refused, by name, not the file
        errors.setdefault(key, []).append(_("Contains a NUL character (\\x00)."))
    if len(value) > max_length:
        errors.setdefault(key, []).append(
            _("At most %(max)s characters (this has %(len)s).") % {"max": max_length, "len": len(value)}
        )
    return value


def _choice(data, key, choices, errors):
    value = data.get(key) or ""
    if not isinstance(value, str) or (value and value not in choices):
        errors.setdefault(key, []).append(
            _("%(value)r is not one of: %(choices)s.") % {"value": value, "choices": ", ".join(choices)}
        )
        return ""
    return value


def _clean_row(raw, *, status, split):
    """Validate one row's values. Returns (values, errors)."""
    errors = {}
    if raw.error:
        return {}, {"row": [raw.error]}
    data = raw.data
    values = {
        "instruction": _text(data, "instruction", INSTRUCTION_MAX_LENGTH, errors, required=True),
        "input": _text(data, "input", INPUT_MAX_LENGTH, errors),
        "output": _text(data, "output", OUTPUT_MAX_LENGTH, errors, required=True),
        "category": _text(data, "category", 100, errors),
        "status": status or _choice(data, "status", QAPair.Status.values, errors),
        "split": split or _choice(data, "split", QAPair.Split.values, errors),
    }
    if values["instruction"] and not normalise_question(values["instruction"], values["input"]):
        errors.setdefault("instruction", []).append(_("The question must contain at least one letter or digit."))
    values["alternates"] = None  # a file without them (the seed's) leaves a stored pair's alternates alone
    if "alternates" in data:
        values["alternates"], messages = clean_alternates(
            data["alternates"], question_key=normalise_question(values["instruction"], values["input"])
        )
        if messages:
            errors["alternates"] = messages
    raw_id = data.get("id")
    if raw_id not in (None, ""):
        try:
            values["id"] = int(raw_id)
            if values["id"] < 1:
                raise ValueError
        except (TypeError, ValueError):
            errors.setdefault("id", []).append(_("%(value)r is not a pair id (a positive whole number).") % {"value": raw_id})
    return values, errors


def _plan(raw_rows, *, status, split):
    """Decide what each row would do, without writing anything."""
    planned = []
    first_row_of = {}  # question hash -> (row number, values) within this file
    hashes = {}
    cleaned = []
    for raw in raw_rows:
        values, errors = _clean_row(raw, status=status, split=split)
        cleaned.append((raw, values, errors))
        if not errors:
            hashes[raw.number] = question_hash(values["instruction"], values["input"])
    existing_by_hash = {pair.question_hash: pair for pair in QAPair.objects.filter(question_hash__in=hashes.values())}
    ids = [values["id"] for _raw, values, errors in cleaned if not errors and "id" in values]
    existing_by_id = {pair.pk: pair for pair in QAPair.objects.filter(pk__in=ids)}
    existing_by_hash.update({pair.question_hash: pair for pair in existing_by_id.values()})
    category_names = {cat.pk: cat.name for cat in Category.objects.all()}

    for raw, values, errors in cleaned:
        result = RowResult(
            row=raw.number, action=RowAction.REJECTED, instruction=values.get("instruction", ""), warnings=raw.warnings
        )
        planned.append(_Planned(result, values))
        if errors:
            result.errors = errors
            result.reason = _("Invalid values.")
            continue
        digest = hashes[raw.number]
        if digest in first_row_of:
            first_row, first_values = first_row_of[digest]
            if first_values["output"] != values["output"]:
                result.errors = {
                    "output": [
                        _("Row %(row)s asks the same question with a different answer; keep one.") % {"row": first_row}
                    ]
                }
                result.reason = _("Conflicting answers in this file.")
            elif values["alternates"] is not None and first_values["alternates"] != values["alternates"]:
                result.errors = {
                    "alternates": [
                        _("Row %(row)s asks the same question with other alternate questions; keep one.")
                        % {"row": first_row}
                    ]
                }
                result.reason = _("Conflicting answers in this file.")
            else:
                result.action = RowAction.SKIPPED
                result.reason = _("Duplicate of row %(row)s in this file.") % {"row": first_row}
                planned[-1].duplicate = True
            continue
        first_row_of[digest] = (raw.number, values)

        pair = existing_by_id.get(values.get("id")) if "id" in values else None
        same_question = existing_by_hash.get(digest)
        if pair is not None and same_question is not None and same_question.pk != pair.pk:
            result.errors = {
                "instruction": [
                    _("Pair #%(id)s would get the question already stored as pair #%(other)s.")
                    % {"id": pair.pk, "other": same_question.pk}
                ]
            }
            result.reason = _("The question belongs to another pair.")
            continue
        pair = pair or same_question
        planned[-1].pair = pair
        if values["alternates"] is None:
            values["alternates"] = list(pair.alternates) if pair is not None else []
        if pair is None:
            result.action = RowAction.CREATED
            continue
        result.pair_id = pair.pk
        changes = _changes(pair, values, category_names)
        if changes:
            result.action = RowAction.UPDATED
            result.reason = _("Changed: %(fields)s.") % {"fields": ", ".join(changes)}
        else:
            result.action = RowAction.SKIPPED
            result.reason = _("Already stored as pair #%(id)s.") % {"id": pair.pk}
    _check_questions_across_rows(planned)
    return planned


def _check_questions_across_rows(planned):
    """Refuse a row whose question or alternate another pair asks once the file is imported:
    a stored pair the file leaves alone, or another row of the file.

    A pair the file updates is judged by its row, not by what is stored, so a file may move an
    alternate from one pair to another.
    """
    rows = [item for item in planned if item.result.action != RowAction.REJECTED and not item.duplicate]
    updated = [item.pair.pk for item in rows if item.pair is not None]
    asked = {}  # normalised question -> (row number, "row"): the first row of the file that asks it
    texts_of = {}
    for item in rows:
        question = normalise_question(item.values["instruction"], item.values["input"])
        texts_of[item.result.row] = [(question, item.values["instruction"], "instruction")] + [
            (normalise_question(text), text, "alternates") for text in item.values["alternates"]
        ]
    keys = {key for texts in texts_of.values() for key, _text, _field in texts}
    stored = question_owners(keys, exclude=updated)
    for item in rows:
        for key, _text, _field in texts_of[item.result.row]:
            asked.setdefault(key, (item.result.row, "row"))
    for item in rows:
        errors = {}
        for key, text, name in texts_of[item.result.row]:
            owner = stored.get(key)  # (a row asking a stored pair's question updates that pair: not here)
            if owner is not None:
                errors.setdefault(name, []).append(owner_message(text, owner))
            elif asked[key][0] != item.result.row:
                errors.setdefault(name, []).append(owner_message(text, asked[key]))
        if errors:
            item.result.action = RowAction.REJECTED
            item.result.errors = errors
            item.result.reason = _("A question is asked by another pair.")


def _changes(pair, values, category_names):
    changed = [name for name in ("instruction", "input", "output", "alternates") if getattr(pair, name) != values[name]]
    if values["category"] and category_names.get(pair.category_id) != values["category"]:
        changed.append("category")
    for name in ("status", "split"):
        if values[name] and getattr(pair, name) != values[name]:
            changed.append(name)
    return changed


def qa_import(*, content, filename, file_format=None, status=None, split=None, user=None, dry_run=False, track=None):
    """Import a JSON / JSONL / CSV file of Q&A pairs, all or nothing.

    status / split, when given, apply to every row (they override the file's own columns).
    track, when given, wraps the rows as they are saved, the slow part (import_qa's progress bar).
    Returns an ImportReport; nothing is written unless every row is acceptable.
    """
    report = ImportReport(filename=filename, dry_run=dry_run)
    if len(content) > settings.CSP_IMPORT_MAX_BYTES:
        report.file_error = _("The file is %(size)s bytes; the limit is %(max)s.") % {
            "size": len(content),
            "max": settings.CSP_IMPORT_MAX_BYTES,
        }
        return report
    try:
        report.file_format = formats.detect_format(filename, file_format)
        raw_rows = formats.parse(content, filename, report.file_format)
    except formats.FileFormatError as exc:
        report.file_error = str(exc)
        return report
    if not raw_rows:
        report.file_error = _("The file holds no Q&A pairs.")
        return report
    if len(raw_rows) > settings.CSP_IMPORT_MAX_ROWS:
        report.file_error = _("The file has %(rows)s rows; the limit is %(max)s per upload.") % {
            "rows": len(raw_rows),
            "max": settings.CSP_IMPORT_MAX_ROWS,
        }
        return report

    with transaction.atomic():
        planned = _plan(raw_rows, status=status, split=split)
        report.rows = [item.result for item in planned]
        if not report.ok or dry_run:
            return report
        _apply(track(planned) if track else planned, user=user, filename=filename)
        report.committed = True
    return report


def _apply(planned, *, user, filename):
    categories = {}

    def category_for(name):
        if name not in categories:
            categories[name], _created = Category.objects.get_or_create(name=name)
        return categories[name]

    created, updated = [], []
    for item in planned:
        values, result = item.values, item.result
        if result.action == RowAction.CREATED:
            pair = QAPair(
                instruction=values["instruction"],
                input=values["input"],
                output=values["output"],
                alternates=values["alternates"],
                status=values["status"] or QAPair.Status.DRAFT,
                split=values["split"] or QAPair.Split.AUTO,
                source=QAPair.Source.IMPORT,
                category=category_for(values["category"]) if values["category"] else None,
                created_by=user,
                updated_by=user,
            )
            pair.save()
            result.pair_id = pair.pk
            created.append(pair)
        elif result.action == RowAction.UPDATED:
            pair = item.pair
            pair.instruction, pair.input, pair.output = values["instruction"], values["input"], values["output"]
            pair.alternates = values["alternates"]
            if values["category"]:
                pair.category = category_for(values["category"])
            pair.status = values["status"] or pair.status
            pair.split = values["split"] or pair.split
            pair.updated_by = user
            pair.save()
            updated.append(pair)
    message = _("Imported from %(file)s.") % {"file": filename}
    _log(user, created, ADDITION, message)
    _log(user, updated, CHANGE, message)


def _log(user, pairs, flag, message):
    if user is None or not pairs:
        return
    LogEntry.objects.log_actions(user.pk, pairs, flag, change_message=message)


def qa_export(*, pairs, file_format):
    """Serialise pairs (a queryset) to bytes in the given format."""
    records = [pair.as_record() for pair in pairs.select_related("category").order_by("id")]
    return formats.serialise(records, file_format)


def _bulk_update(pairs, user, message, **values):
    """Give every pair these field values; save and log only the pairs that change."""
    changed = list(pairs.exclude(**values))
    for pair in changed:
        for name, value in values.items():
            setattr(pair, name, value)
        pair.updated_by = user
        pair.save(update_fields=[*values, "updated_by", "updated_at"])
    _log(user, changed, CHANGE, message)
    return len(changed)


def qa_set_status(*, pairs, status, user):
    """Set the status of many pairs; returns how many changed. Recorded in the admin history."""
    message = _("Status set to %(status)s.") % {"status": QAPair.Status(status).label}
    return _bulk_update(pairs, user, message, status=status)


def qa_move_to_category(*, pairs, category, user):
    """Move many pairs into one category; returns how many changed."""
    return _bulk_update(pairs, user, _("Moved to category %(name)s.") % {"name": category.name}, category=category)


# --- Drafts from elsewhere (chat's review queue and handoff replies) ---


def qa_draft_create(*, instruction, output, source, note, input="", category=None, user=None):
    """Store a draft QAPair after the checks the admin runs; returns it, recorded in the history.

    Raises ValidationError (by field: instruction, input, output) and stores nothing when the
    pair is not acceptable, e.g. when the same question is already stored (the error names that
    pair). `note` says in the admin history where the draft came from.
    """
    pair = QAPair(
        instruction=(instruction or "").strip(),
        input=(input or "").strip(),
        output=(output or "").strip(),
        category=category,
        status=QAPair.Status.DRAFT,
        source=source,
        created_by=user,
        updated_by=user,
    )
    errors = {}
    for check in (lambda: pair.clean_fields(exclude=["question_hash", "created_by", "updated_by"]), pair.clean):
        try:
            check()
        except ValidationError as exc:
            for name, messages in exc.message_dict.items():
                errors.setdefault(name, messages)  # a field's own error first; clean() repeats "blank"
    if errors:
        raise ValidationError(errors)
    pair.save()
    _log(user, [pair], ADDITION, note)
    return pair


# --- Teaching a paraphrase (the handoff reply page, the review queue, the API) ---


def qa_alternate_add(*, pair, question, user=None):
    """Add a customer's question, as they typed it, to a pair's alternate questions (相似问法), so
    the next customer who asks it that way is matched: retrieval scores a message by the pair's
    closest question, so a paraphrase stored as an alternate scores about 1.0 and is answered
    with the curated answer verbatim. Returns the pair, as stored.

    Checked as the admin and the importers check alternates (`clean_alternates`,
    `question_owners`): raises ValidationError (field "question") and changes nothing when the
    text is empty, too long, would make more than ALTERNATES_MAX alternates, or is the question or
    an alternate of another pair (the message names that pair). When the pair already asks it (its
    own question or one of its alternates, however punctuated) nothing changes and nothing is
    logged. Saving an approved pair changes the approved stamp, so every process's serving index
    picks the alternate up (knowledge.retrieval).
    """
    text = question.strip() if isinstance(question, str) else ""
    key = normalise_question(text)
    with transaction.atomic():
        # Read again, locked: two agents teaching the same pair at once must not lose one alternate.
        pair = QAPair.objects.select_for_update().get(pk=pair.pk)
        own = normalise_question(pair.instruction, pair.input)
        if key and key in {own, *map(normalise_question, pair.alternates)}:
            return pair
        alternates, messages = clean_alternates([*pair.alternates, text], question_key=own)
        if not messages:
            owner = question_owners([key], exclude=[pair.pk]).get(key)
            if owner is not None:
                messages = [owner_message(text, owner)]
        if messages:
            raise ValidationError({"question": messages})
        pair.alternates = alternates
        pair.updated_by = user
        pair.save(update_fields=["alternates", "updated_by", "updated_at"])
        _log(user, [pair], CHANGE, _("Alternate question added: “%(text)s”.") % {"text": text})
    return pair
