import csv
import io
import json

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.core.management import CommandError, call_command

from knowledge import services
from knowledge.models import Category, QAPair

pytestmark = [pytest.mark.django_db, pytest.mark.services]


def _json(rows):
    return json.dumps(rows, ensure_ascii=False).encode()


GOOD = [
    {"instruction": "用户问：如何退货？", "input": "", "output": "7天无理由退货。", "category": "退货退款"},
    {"instruction": "用户问：发货需要多久？", "input": "", "output": "现货24小时内发货。"},
]


def test_good_json_file_creates_pairs_with_categories(staff_user):
    report = services.qa_import(content=_json(GOOD), filename="faq.json", user=staff_user)
    assert report.committed and report.counts == {"created": 2, "updated": 0, "skipped": 0, "rejected": 0}
    pair = QAPair.objects.get(instruction="用户问：如何退货？")
    assert pair.category.name == "退货退款"
    assert pair.status == QAPair.Status.DRAFT and pair.source == QAPair.Source.IMPORT
    assert pair.created_by == staff_user


def test_bad_row_rejects_the_whole_upload_and_names_row_and_field():
    rows = GOOD + [{"instruction": "用户问：能开发票吗？", "input": "", "output": "   "}, {"instruction": 5, "output": "x"}]
    report = services.qa_import(content=_json(rows), filename="faq.json")
    assert not report.committed and QAPair.objects.count() == 0 and Category.objects.count() == 0
    rejected = {row.row: row.errors for row in report.rows if row.action == "rejected"}
    assert set(rejected) == {3, 4}
    assert "output" in rejected[3] and "instruction" in rejected[4]
    assert [row.action for row in report.rows[:2]] == ["created", "created"]


def test_a_nul_character_rejects_its_row_by_field_not_the_database():
    rows = GOOD + [{"instruction": "用户问：能开发票吗？", "input": "", "output": "可以\x00开"}]
    report = services.qa_import(content=_json(rows), filename="faq.json")
    assert not report.committed and QAPair.objects.count() == 0
    assert report.rows[-1].action == "rejected" and list(report.rows[-1].errors) == ["output"]


def test_non_object_entry_is_a_rejected_row():
    report = services.qa_import(content=_json(GOOD + ["just text"]), filename="faq.json")
    assert report.rows[-1].action == "rejected" and report.rows[-1].row == 3
    assert QAPair.objects.count() == 0


def test_invalid_json_is_a_file_error_with_position():
    report = services.qa_import(content=b'[{"instruction": "a",', filename="faq.json")
    assert "line 1" in report.file_error and not report.committed


def test_unknown_extension_is_a_file_error():
    report = services.qa_import(content=_json(GOOD), filename="faq.txt")
    assert ".json" in report.file_error


def test_jsonl_bad_line_reports_its_line_number():
    content = (json.dumps(GOOD[0], ensure_ascii=False) + "\n\n{broken\n").encode()
    report = services.qa_import(content=content, filename="faq.jsonl")
    assert [(row.row, row.action) for row in report.rows] == [(1, "created"), (3, "rejected")]
    assert QAPair.objects.count() == 0


def test_csv_without_output_column_is_a_file_error():
    report = services.qa_import(content="instruction,answer\n如何退货,7天\n".encode(), filename="faq.csv")
    assert "output" in report.file_error


def test_gb18030_csv_from_excel_imports():
    content = "instruction,input,output\n如何退货？,,7天无理由退货。\n".encode("gb18030")
    report = services.qa_import(content=content, filename="faq.csv")
    assert report.committed and QAPair.objects.get().output == "7天无理由退货。"


def test_same_question_twice_in_a_file_is_skipped_or_rejected():
    same = dict(GOOD[0], instruction="如何退货")
    report = services.qa_import(content=_json([GOOD[0], same]), filename="a.json")
    assert report.rows[1].action == "skipped" and "row 1" in report.rows[1].reason.lower()
    conflicting = dict(same, output="30天退货")
    report = services.qa_import(content=_json([GOOD[0], conflicting]), filename="b.json")
    assert report.rows[1].action == "rejected" and "output" in report.rows[1].errors
    assert QAPair.objects.count() == 1  # only the first upload saved


def test_reimport_skips_unchanged_and_updates_changed_answers(staff_user):
    services.qa_import(content=_json(GOOD), filename="faq.json", user=staff_user)
    changed = [GOOD[0], dict(GOOD[1], output="现货12小时内发货。")]
    report = services.qa_import(content=_json(changed), filename="faq.json", user=staff_user)
    assert [row.action for row in report.rows] == ["skipped", "updated"]
    assert QAPair.objects.get(instruction="用户问：发货需要多久？").output == "现货12小时内发货。"
    assert QAPair.objects.count() == 2


def test_status_and_split_options_override_the_file():
    rows = [dict(GOOD[0], status="archived", split="dev")]
    services.qa_import(content=_json(rows), filename="faq.json", status="approved", split="train")
    pair = QAPair.objects.get()
    assert (pair.status, pair.split) == ("approved", "train")


def test_invalid_status_in_file_is_rejected():
    report = services.qa_import(content=_json([dict(GOOD[0], status="published")]), filename="faq.json")
    assert "status" in report.rows[0].errors


def test_dry_run_writes_nothing():
    report = services.qa_import(content=_json(GOOD), filename="faq.json", dry_run=True)
    assert report.ok and not report.committed and QAPair.objects.count() == 0


def test_id_that_would_steal_another_pairs_question_is_rejected():
    services.qa_import(content=_json(GOOD), filename="faq.json")
    first, second = QAPair.objects.order_by("id")
    rows = [{"id": second.pk, "instruction": first.instruction, "output": "x"}]
    report = services.qa_import(content=_json(rows), filename="faq.json")
    assert report.rows[0].action == "rejected" and "instruction" in report.rows[0].errors


def test_import_is_recorded_in_the_admin_history(staff_user):
    services.qa_import(content=_json(GOOD), filename="faq.json", user=staff_user)
    services.qa_import(content=_json([dict(GOOD[0], output="新答案")]), filename="faq.json", user=staff_user)
    assert LogEntry.objects.filter(action_flag=ADDITION).count() == 2
    assert LogEntry.objects.filter(action_flag=CHANGE).count() == 1


@pytest.mark.parametrize("file_format", ["json", "jsonl", "csv"])
def test_export_then_import_round_trip_is_lossless(file_format):
    services.qa_import(content=_json(GOOD), filename="faq.json", status="approved", split="dev")
    QAPair.objects.create(instruction="多行\n问题", input="订单号：1,2\"3\"", output="第一行\n- 第二行\n=SUM(1)", split="train")
    assert_export_import_round_trip(file_format)


def assert_export_import_round_trip(file_format):
    """Export every pair in `file_format`, delete them, import the file: the same records come back (ids aside)."""
    before = [pair.as_record() for pair in QAPair.objects.order_by("id")]
    exported = services.qa_export(pairs=QAPair.objects.all(), file_format=file_format)
    QAPair.objects.all().delete()
    report = services.qa_import(content=exported, filename=f"export.{file_format}")
    assert report.committed, report.as_dict()
    after = [pair.as_record() for pair in QAPair.objects.order_by("id")]
    strip_ids = lambda records: [{k: v for k, v in r.items() if k != "id"} for r in records]  # noqa: E731
    assert strip_ids(after) == strip_ids(before)


def test_csv_export_has_header_and_bom_for_excel():
    QAPair.objects.create(instruction="如何退货？", output="7天")
    content = services.qa_export(pairs=QAPair.objects.all(), file_format="csv")
    assert content.startswith("\ufeff".encode())
    header = next(csv.reader(io.StringIO(content.decode("utf-8-sig"))))
    assert header[:3] == ["instruction", "input", "output"]


def test_import_qa_command_imports_sample_data(tmp_path, settings):
    call_command("import_qa", str(settings.CSP_SAMPLE_DATA[0]), "--status", "approved", "--split", "train")
    assert QAPair.objects.filter(status="approved", split="train").count() >= 100


def test_import_qa_command_fails_on_bad_rows_and_saves_nothing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(_json(GOOD + [{"instruction": "", "output": ""}]))
    with pytest.raises(CommandError, match="Nothing was imported"):
        call_command("import_qa", str(bad))
    assert QAPair.objects.count() == 0


def test_export_qa_command_filters_by_status(tmp_path):
    services.qa_import(content=_json(GOOD[:1]), filename="a.json", status="approved")
    services.qa_import(content=_json(GOOD[1:]), filename="b.json", status="draft")
    out = tmp_path / "approved.jsonl"
    call_command("export_qa", str(out), "--status", "approved")
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["instruction"] == GOOD[0]["instruction"]
