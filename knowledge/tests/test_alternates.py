"""Alternate questions (相似问法): one set of checks for the admin, the API and every import format;
exports that import back unchanged."""

import csv
import io
import json

import pytest
from django.urls import reverse

from knowledge import formats, services
from knowledge.models import ALTERNATE_MAX_LENGTH, QAPair
from knowledge.tests.factories import make_pair
from knowledge.tests.test_import import assert_export_import_round_trip

pytestmark = [pytest.mark.django_db, pytest.mark.services]

PAIRS = "/api/v1/qa-pairs/"
TOO_LONG = "问" * (ALTERNATE_MAX_LENGTH + 1)


@pytest.fixture
def stored():
    """A stored pair with alternates, whose question and alternates others may not ask again."""
    return make_pair("用户问：如何退货？", "7天无理由退货。", alternates=["怎么退货", "东西不想要了能退吗"])


# Each bad alternate list, and a word its message must contain.
BAD = {
    "empty": (["运费谁出", "  "], "empty"),
    "punctuation only": (["？！"], "empty"),
    "too long": ([TOO_LONG], str(ALTERNATE_MAX_LENGTH)),
    "another pair's question": (["如何 退货"], "question of pair"),
    "another pair's alternate": (["怎么退货？"], "alternate question of pair"),
    "its own question": (["运费谁承担"], "own question"),
    "twice in the pair": (["退货运费", "退货 运费！"], "repeats alternate 1"),
    "the CSV separator": (["运费||邮费"], "||"),
}


def _file(rows, file_format):
    if file_format == "json":
        return json.dumps(rows, ensure_ascii=False).encode()
    if file_format == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["instruction", "output", "alternates"])
    writer.writeheader()
    writer.writerows(dict(row, alternates=" || ".join(row["alternates"])) for row in rows)
    return buffer.getvalue().encode()


def test_a_pair_stores_its_alternates_stripped_and_the_model_accepts_good_ones(stored):
    pair = QAPair(instruction="退货运费谁承担？", output="质量问题由商家承担。", alternates=[" 退货邮费谁出 ", "寄回运费"])
    pair.full_clean()
    pair.save()
    pair.refresh_from_db()
    assert pair.alternates == ["退货邮费谁出", "寄回运费"]


@pytest.mark.parametrize("case", list(BAD))
def test_the_admin_form_refuses_a_bad_alternate_on_its_field(staff_client, stored, case):
    alternates, word = BAD[case]
    response = staff_client.post(
        reverse("admin:knowledge_qapair_add"),
        {
            "instruction": "运费谁承担？", "alternates": "\n".join(alternates), "input": "", "output": "商家承担。",
            "status": "draft", "split": "auto",
        },
        HTTP_ACCEPT_LANGUAGE="en",  # the messages are read in English
    )
    if case == "empty":  # a blank line in the textarea is no alternate at all
        assert response.status_code == 302 and QAPair.objects.get(instruction="运费谁承担？").alternates == ["运费谁出"]
        return
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["alternates"] and word in " ".join(errors["alternates"])
    assert QAPair.objects.count() == 1


def test_the_admin_edits_alternates_one_per_line_and_lists_and_searches_them(staff_client, stored):
    change = reverse("admin:knowledge_qapair_change", args=[stored.pk])
    assert "怎么退货\n东西不想要了能退吗" in response_text(staff_client.get(change))
    response = staff_client.post(
        change,
        {
            "instruction": stored.instruction, "alternates": "怎么退货\n\n 退货怎么操作 \n", "input": "",
            "output": stored.output, "status": "approved", "split": "auto",
        },
    )
    assert response.status_code == 302
    stored.refresh_from_db()
    assert stored.alternates == ["怎么退货", "退货怎么操作"]
    make_pair("用户问：几天发货？")
    changelist = staff_client.get(reverse("admin:knowledge_qapair_changelist"), {"q": "怎么操作"})
    assert list(changelist.context["cl"].result_list) == [stored]
    assert 'class="field-alternate_count">2<' in response_text(changelist)


def response_text(response):
    return response.content.decode()


@pytest.mark.parametrize("case", list(BAD))
def test_the_api_refuses_a_bad_alternate_with_the_models_message(staff_api, stored, case):
    alternates, word = BAD[case]
    response = staff_api.post(
        PAIRS, {"instruction": "运费谁承担？", "output": "商家承担。", "alternates": alternates}, format="json", HTTP_ACCEPT_LANGUAGE="en"
    )
    assert response.status_code == 400, response.json()
    assert list(response.json()) == ["alternates"] and word in " ".join(response.json()["alternates"])


def test_the_api_reads_and_writes_alternates(staff_api, stored):
    assert staff_api.get(f"{PAIRS}{stored.pk}/").json()["alternates"] == ["怎么退货", "东西不想要了能退吗"]
    response = staff_api.patch(f"{PAIRS}{stored.pk}/", {"alternates": ["退货流程"]}, format="json")
    assert response.status_code == 200 and response.json()["alternates"] == ["退货流程"]
    assert staff_api.get(PAIRS, {"search": "退货流程"}).json()["results"][0]["id"] == stored.pk
    assert staff_api.patch(f"{PAIRS}{stored.pk}/", {"alternates": "退货流程"}, format="json").status_code == 400


def test_the_openapi_schema_shows_alternates_as_a_list_of_strings(staff_api):
    schema = staff_api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    field = schema["components"]["schemas"]["QAPair"]["properties"]["alternates"]
    assert field["type"] == "array" and field["items"]["type"] == "string" and "||" in field["description"]


@pytest.mark.parametrize("file_format", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("case", [case for case in BAD if case != "the CSV separator"])
def test_an_import_rejects_a_bad_alternate_by_row_and_field(stored, file_format, case):
    alternates, word = BAD[case]
    rows = [
        {"instruction": "几天发货？", "output": "24小时内发货。", "alternates": ["多久发货"]},
        {"instruction": "运费谁承担？", "output": "商家承担。", "alternates": alternates},
    ]
    report = services.qa_import(content=_file(rows, file_format), filename=f"faq.{file_format}")
    assert not report.committed and QAPair.objects.count() == 1
    assert [(row.row, row.action) for row in report.rows] == [(1, "created"), (2, "rejected")]
    assert list(report.rows[1].errors) == ["alternates"] and word in " ".join(report.rows[1].errors["alternates"])


@pytest.mark.parametrize("file_format", ["json", "jsonl"])
def test_a_json_alternate_with_the_csv_separator_or_of_the_wrong_type_is_rejected(file_format):
    rows = [
        {"instruction": "运费谁承担？", "output": "商家承担。", "alternates": ["运费||邮费"]},
        {"instruction": "几天发货？", "output": "24小时内发货。", "alternates": "多久发货"},
        {"instruction": "能开发票吗？", "output": "可以。", "alternates": [3]},
    ]
    report = services.qa_import(content=_file(rows, file_format), filename=f"faq.{file_format}")
    assert [list(row.errors) for row in report.rows] == [["alternates"]] * 3


def test_an_import_rejects_a_question_asked_by_another_row_or_stored_as_an_alternate(stored):
    rows = [
        {"instruction": "几天发货？", "output": "24小时内发货。", "alternates": ["多久发货"]},
        {"instruction": "什么时候发货", "output": "24小时内。", "alternates": ["多久 发货？"]},
        {"instruction": "东西不想要了能退吗", "output": "可以。"},
    ]
    report = services.qa_import(content=_file(rows, "json"), filename="faq.json")
    assert not report.committed and [row.action for row in report.rows] == ["created", "rejected", "rejected"]
    assert list(report.rows[1].errors) == ["alternates"] and "row 1" in report.rows[1].errors["alternates"][0]
    assert f"pair #{stored.pk}" in report.rows[2].errors["instruction"][0]


def test_an_import_may_move_an_alternate_between_the_pairs_it_updates(stored):
    other = make_pair("用户问：退货流程？", "登录后申请。")
    rows = [
        {"id": stored.pk, "instruction": stored.instruction, "output": stored.output, "alternates": ["怎么退货"]},
        {"id": other.pk, "instruction": other.instruction, "output": other.output, "alternates": ["东西不想要了能退吗"]},
    ]
    report = services.qa_import(content=_file(rows, "json"), filename="faq.json")
    assert report.committed, report.as_dict()
    other.refresh_from_db()
    assert other.alternates == ["东西不想要了能退吗"]


def test_the_same_question_twice_with_other_alternates_is_a_conflict():
    rows = [
        {"instruction": "几天发货？", "output": "24小时内发货。", "alternates": ["多久发货"]},
        {"instruction": "几天发货", "output": "24小时内发货。", "alternates": []},
    ]
    report = services.qa_import(content=_file(rows, "json"), filename="faq.json")
    assert report.rows[1].action == "rejected" and "alternates" in report.rows[1].errors


def test_old_files_without_alternates_still_import_and_keep_stored_alternates(stored):
    old_json = json.dumps([{"instruction": "几天发货？", "input": "", "output": "24小时。"}], ensure_ascii=False)
    assert services.qa_import(content=old_json.encode(), filename="a.json").committed
    old_csv = "instruction,input,output\n能开发票吗？,,可以。\n"
    assert services.qa_import(content=old_csv.encode(), filename="a.csv").committed
    assert [pair.alternates for pair in QAPair.objects.exclude(pk=stored.pk)] == [[], []]
    old_json = json.dumps([{"instruction": stored.instruction, "output": "新答案"}], ensure_ascii=False)
    assert services.qa_import(content=old_json.encode(), filename="b.json").committed
    stored.refresh_from_db()
    assert stored.output == "新答案" and stored.alternates == ["怎么退货", "东西不想要了能退吗"]


@pytest.mark.parametrize("file_format", ["json", "jsonl", "csv"])
def test_alternates_round_trip_through_every_export_format(stored, file_format):
    make_pair("多行\n问题", "答案", alternates=["=SUM(1)", "'=已经引用", "-5% 还能用吗", "@客服 在吗"])
    make_pair("用户问：几天发货？", "24小时。", alternates=["多久发货", "'Tis 发货"])
    make_pair("用户问：能开发票吗？", "可以。")
    assert_export_import_round_trip(file_format)


def test_the_csv_cell_joins_alternates_with_the_documented_separator_and_guards_formulas(stored):
    make_pair("用户问：几天发货？", "24小时。", alternates=["=HYPERLINK(1)", "多久发货"])
    cells = list(csv.DictReader(io.StringIO(services.qa_export(pairs=QAPair.objects.all(), file_format="csv").decode("utf-8-sig"))))
    assert [row["alternates"] for row in cells] == ["怎么退货 || 东西不想要了能退吗", "'=HYPERLINK(1) || 多久发货"]
    assert formats.alternates_from_cell("a||b ||  c") == ["a", "b", "c"] and formats.alternates_from_cell(" ") == []


def test_the_api_reports_an_alternate_that_is_not_text_in_one_flat_list(staff_api):
    response = staff_api.post(
        PAIRS, {"instruction": "运费谁承担？", "output": "商家承担。", "alternates": ["运费谁出", {"a": 1}, 3]}, format="json",
        HTTP_ACCEPT_LANGUAGE="en",
    )
    assert response.status_code == 400
    assert response.json() == {"alternates": ["Alternate 2 must be text, not dict.", "Alternate 3 must be text, not int."]}
