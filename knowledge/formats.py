"""Reading and writing Q&A files in the seed's alpaca format: JSON, JSONL and CSV.

Pure functions over bytes, so the admin, the REST API and the management commands share them.
Reading never raises on a bad row: each row comes back with its own error, and the caller
decides (the import service rejects the whole upload when any row is bad). A file that cannot
be read at all raises FileFormatError with a message for a person.

CSV cells are guarded against formula injection (OWASP "CSV Injection"): a spreadsheet runs a
cell that starts with = + - @, a tab or a carriage return as a formula, so
`=HYPERLINK(...)` in a customer's question would run on the curator's machine. Export prefixes
such a cell with `'`, which spreadsheets show as text; import takes that `'` off again. The rule
that keeps the round trip lossless: a cell gets the extra `'` when, after any leading `'`s, it
starts with one of those characters, and import removes one `'` only from a cell of that shape
("'Tis", "'quoted'" stay as they are both ways; "'=x" is written "''=x"). JSON and JSONL are
written and read unchanged.

A pair's alternate questions are a list under the key `alternates` in JSON and JSONL, and one
CSV cell `alternates` that joins them with " || " (ALTERNATE_CELL_SEPARATOR). No alternate may
contain "||" (the knowledge base refuses it), so the cell needs no escaping. The cell is
neutralised as a whole, as any other: only its start can make a spreadsheet run it. A file
without alternates (the seed's) reads as pairs without any.
"""

import csv
import io
import json
import re
from dataclasses import dataclass, field

from django.utils.translation import gettext as _

from csplatform.parsers import JSONNestingError, loads_json
from knowledge.models import ALTERNATE_SEPARATOR

FORMATS = ("json", "jsonl", "csv")
CONTENT_TYPES = {
    "json": "application/json; charset=utf-8",
    "jsonl": "application/x-ndjson; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
}
# Column order of every export; import accepts them in any order.
FIELDS = ("instruction", "input", "output", "alternates", "category", "split", "status", "id")
REQUIRED_COLUMNS = ("instruction", "output")
# OWASP's list of characters that make a spreadsheet read a cell as a formula.
FORMULA_START = "=+-@\t\r"
_FORMULA_LIKE = re.compile(f"[{re.escape(FORMULA_START)}]")
_NEUTRALISED = re.compile(f"'+[{re.escape(FORMULA_START)}]")  # what export makes of a formula-like cell


ALTERNATE_CELL_SEPARATOR = f" {ALTERNATE_SEPARATOR} "


class FileFormatError(ValueError):
    """The file as a whole cannot be read (not the fault of one row)."""


@dataclass
class RawRow:
    number: int  # 1-based: the array index + 1 for JSON, the line for JSONL, the data row for CSV
    data: dict | None
    error: str = ""
    warnings: dict = field(default_factory=dict)  # field name -> messages; the row is still imported


def neutralise_formula(text):
    """A CSV cell's text as export writes it: `'` before a cell a spreadsheet would run."""
    return "'" + text if _FORMULA_LIKE.match(text.lstrip("'")) else text


def restore_formula(cell):
    """The text of a cell written by neutralise_formula (any other cell is returned unchanged)."""
    return cell[1:] if _NEUTRALISED.match(cell) else cell


def alternates_cell(alternates):
    """A pair's alternates as one CSV cell's text (before formula neutralisation)."""
    return ALTERNATE_CELL_SEPARATOR.join(alternates)


def alternates_from_cell(cell):
    """The alternates of a CSV cell: split at "||", each stripped ("" for an empty one, which
    validation then refuses by its position); an empty cell holds none."""
    if not cell.strip():
        return []
    return [text.strip() for text in cell.split(ALTERNATE_SEPARATOR)]


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
        data = loads_json(text)
    except JSONNestingError as exc:
        raise FileFormatError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            _("Not valid JSON: %(msg)s at line %(line)s, column %(col)s.")
            % {"msg": exc.msg, "line": exc.lineno, "col": exc.colno}
        ) from None
    except ValueError as exc:  # e.g. an integer of more than 4 300 digits
        raise FileFormatError(_("Not valid JSON: %(msg)s.") % {"msg": exc}) from None
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
            item = loads_json(line)
        except JSONNestingError as exc:
            rows.append(RawRow(number, None, str(exc)))
            continue
        except json.JSONDecodeError as exc:
            rows.append(RawRow(number, None, _("Not valid JSON: %(msg)s.") % {"msg": exc.msg}))
            continue
        except ValueError as exc:  # e.g. an integer of more than 4 300 digits
            rows.append(RawRow(number, None, _("Not valid JSON: %(msg)s.") % {"msg": exc}))
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
            cells = {key: value for key, value in item.items() if value is not None}
            data = {key: restore_formula(value) for key, value in cells.items()}
            if "alternates" in data:
                data["alternates"] = alternates_from_cell(data["alternates"])
            rows.append(RawRow(number, data, warnings=_formula_warnings(cells)))
    except csv.Error as exc:
        raise FileFormatError(_("Not valid CSV: %(msg)s.") % {"msg": exc}) from None
    return rows


def _formula_warnings(cells):
    """Cells of an imported CSV that a spreadsheet would run (our own export has none)."""
    return {
        name: [
            _("Starts with %(char)s: a spreadsheet opening this file runs the cell as a formula.")
            % {"char": ascii(value[0]) if value[0] in "\t\r" else value[0]}
        ]
        for name, value in cells.items()
        if name in FIELDS and _FORMULA_LIKE.match(value)
    }


def _raw(number, item):
    if not isinstance(item, dict):
        return RawRow(number, None, _("Each entry must be an object with instruction and output."))
    return RawRow(number, item)


def serialise(records, file_format):
    """records: dicts with FIELDS keys. Returns UTF-8 bytes."""
    records = [
        {field: record.get(field, [] if field == "alternates" else "") for field in FIELDS} for record in records
    ]
    if file_format == "json":
        return (json.dumps(records, ensure_ascii=False, indent=2) + "\n").encode()
    if file_format == "jsonl":
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    if file_format == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(
            {
                name: neutralise_formula(value) if isinstance(value, str) else value
                for name, value in dict(record, alternates=alternates_cell(record["alternates"])).items()
            }
            for record in records
        )
        # The BOM makes Excel open UTF-8 Chinese text correctly; import strips it again.
        return buffer.getvalue().encode("utf-8-sig")
    raise FileFormatError(_("Unknown format %(format)s; use json, jsonl or csv.") % {"format": file_format})
