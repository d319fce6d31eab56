"""Reading and writing Q&A files in the seed's alpaca format: JSON, JSONL and CSV.

Pure functions over bytes, so the admin, the REST API and the management commands share them.
Reading never raises on a bad row: each row comes back with its own error, and the caller
decides (the import service rejects the whole upload when any row is bad). A file that cannot
be read at all raises FileFormatError with a message for a person.
"""

import csv
import io
import json
from dataclasses import dataclass

from django.utils.translation import gettext as _

FORMATS = ("json", "jsonl", "csv")
CONTENT_TYPES = {
    "json": "application/json; charset=utf-8",
    "jsonl": "application/x-ndjson; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
}
# Column order of every export; import accepts them in any order.
FIELDS = ("instruction", "input", "output", "category", "split", "status", "id")
REQUIRED_COLUMNS = ("instruction", "output")


class FileFormatError(ValueError):
    """The file as a whole cannot be read (not the fault of one row)."""


@dataclass
class RawRow:
    number: int  # 1-based: the array index + 1 for JSON, the line for JSONL, the data row for CSV
    data: dict | None
    error: str = ""


def detect_format(filename, declared=None):
    if declared:
        if declared not in FORMATS:
            raise FileFormatError(_("Unknown format %(format)s; use json, jsonl or csv.") % {"format": declared})
        return declared
    suffix = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if suffix in ("json", "jsonl", "csv"):
        return suffix
    if suffix == "ndjson":
        return "jsonl"
    raise FileFormatError(
        _("Cannot tell the format of %(name)s: name it .json, .jsonl or .csv.") % {"name": filename}
    )


def decode(content):
    # Excel on Chinese Windows saves CSV as GB18030/GBK; everything else should be UTF-8.
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return content.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise FileFormatError(_("The file is neither UTF-8 nor GB18030 text."))


def parse(content, filename, declared_format=None):
    file_format = detect_format(filename, declared_format)
    text = decode(content)
    if not text.strip():
        raise FileFormatError(_("The file is empty."))
    return {"json": _parse_json, "jsonl": _parse_jsonl, "csv": _parse_csv}[file_format](text)


def _parse_json(text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            _("Not valid JSON: %(msg)s at line %(line)s, column %(col)s.")
            % {"msg": exc.msg, "line": exc.lineno, "col": exc.colno}
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise FileFormatError(_("A JSON file must hold a list of objects like the seed's train.json."))
    return [_raw(number, item) for number, item in enumerate(data, start=1)]


def _parse_jsonl(text):
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(RawRow(number, None, _("Not valid JSON: %(msg)s.") % {"msg": exc.msg}))
            continue
        rows.append(_raw(number, item))
    return rows


def _parse_csv(text):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise FileFormatError(
            _("The CSV header lacks the column(s) %(missing)s; it needs at least instruction and output.")
            % {"missing": ", ".join(missing)}
        )
    reader.fieldnames = header
    rows = []
    try:
        for number, item in enumerate(reader, start=1):
            if None in item:
                rows.append(RawRow(number, None, _("The row has more cells than the header has columns.")))
                continue
            rows.append(RawRow(number, {key: value for key, value in item.items() if value is not None}))
    except csv.Error as exc:
        raise FileFormatError(_("Not valid CSV: %(msg)s.") % {"msg": exc}) from None
    return rows


def _raw(number, item):
    if not isinstance(item, dict):
        return RawRow(number, None, _("Each entry must be an object with instruction and output."))
    return RawRow(number, item)


def serialise(records, file_format):
    """records: dicts with FIELDS keys. Returns UTF-8 bytes."""
    records = [{field: record.get(field, "") for field in FIELDS} for record in records]
    if file_format == "json":
        return (json.dumps(records, ensure_ascii=False, indent=2) + "\n").encode()
    if file_format == "jsonl":
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    if file_format == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(records)
        # The BOM makes Excel open UTF-8 Chinese text correctly; import strips it again.
        return buffer.getvalue().encode("utf-8-sig")
    raise FileFormatError(_("Unknown format %(format)s; use json, jsonl or csv.") % {"format": file_format})
