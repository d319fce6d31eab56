import json

import pytest
from django.contrib.admin.models import LogEntry
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from knowledge.models import Category, QAPair

pytestmark = [pytest.mark.django_db, pytest.mark.services]

CHANGELIST = "admin:knowledge_qapair_changelist"
IMPORT = "admin:knowledge_qapair_import"


def _upload(rows, name="faq.json"):
    return SimpleUploadedFile(name, json.dumps(rows, ensure_ascii=False).encode(), content_type="application/json")


@pytest.fixture
def pairs():
    return [
        QAPair.objects.create(instruction="如何退货？", output="7天无理由退货。"),
        QAPair.objects.create(instruction="发货需要多久？", output="现货24小时内发货。"),
        QAPair.objects.create(instruction="能开发票吗？", output="可以开具电子发票。", status="approved"),
    ]


def test_changelist_search_finds_questions_and_answers(staff_client, pairs):
    response = staff_client.get(reverse(CHANGELIST), {"q": "发票"})
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [pairs[2]]
    response = staff_client.get(reverse(CHANGELIST), {"q": "24小时"})
    assert list(response.context["cl"].result_list) == [pairs[1]]


def test_changelist_filters_by_status(staff_client, pairs):
    response = staff_client.get(reverse(CHANGELIST), {"status__exact": "approved"})
    assert list(response.context["cl"].result_list) == [pairs[2]]


def test_bulk_approve_changes_status_and_records_history(staff_client, staff_user, pairs):
    response = staff_client.post(
        reverse(CHANGELIST), {"action": "approve", "_selected_action": [pairs[0].pk, pairs[1].pk]}, follow=True
    )
    assert response.status_code == 200
    assert QAPair.objects.filter(status="approved").count() == 3
    assert LogEntry.objects.filter(user=staff_user, object_id=str(pairs[0].pk)).exists()


def test_bulk_archive(staff_client, pairs):
    staff_client.post(reverse(CHANGELIST), {"action": "archive", "_selected_action": [pairs[2].pk]})
    pairs[2].refresh_from_db()
    assert pairs[2].status == "archived"


def test_move_to_category_asks_then_moves(staff_client, pairs):
    category = Category.objects.create(name="物流配送")
    data = {"action": "move_to_category", "_selected_action": [pairs[1].pk]}
    response = staff_client.post(reverse(CHANGELIST), data)
    assert response.status_code == 200 and "category" in response.context["form"].fields
    assert QAPair.objects.get(pk=pairs[1].pk).category is None
    staff_client.post(reverse(CHANGELIST), {**data, "apply": "1", "category": category.pk})
    assert QAPair.objects.get(pk=pairs[1].pk).category == category
    assert QAPair.objects.get(pk=pairs[0].pk).category is None


def test_export_action_downloads_selected_pairs(staff_client, pairs):
    response = staff_client.post(reverse(CHANGELIST), {"action": "export_jsonl", "_selected_action": [pairs[0].pk]})
    lines = response.content.decode().splitlines()
    assert response["Content-Disposition"].startswith("attachment")
    assert [json.loads(line)["instruction"] for line in lines] == ["如何退货？"]


def test_export_button_uses_the_current_filters(staff_client, pairs):
    url = reverse("admin:knowledge_qapair_export")
    response = staff_client.get(url, {"status__exact": "approved", "file_format": "json"})
    assert [row["instruction"] for row in json.loads(response.content)] == ["能开发票吗？"]


def test_change_form_shows_rendered_training_text(staff_client, pairs):
    response = staff_client.get(reverse("admin:knowledge_qapair_change", args=[pairs[0].pk]))
    assert "&lt;start_of_turn&gt;model" in response.content.decode()


def test_adding_a_duplicate_question_shows_a_field_error(staff_client, pairs):
    response = staff_client.post(
        reverse("admin:knowledge_qapair_add"),
        {"instruction": "用户问：如何退货", "input": "", "output": "x", "status": "draft", "split": "auto"},
    )
    assert response.status_code == 200
    assert "instruction" in response.context["adminform"].form.errors
    assert QAPair.objects.count() == 3


def test_adding_a_pair_records_who_created_it(staff_client, staff_user):
    staff_client.post(
        reverse("admin:knowledge_qapair_add"),
        {"instruction": "会员有什么权益？", "input": "", "output": "9折。", "status": "draft", "split": "auto"},
    )
    pair = QAPair.objects.get()
    assert pair.created_by == staff_user == pair.updated_by


def test_import_page_creates_pairs_and_shows_the_report(staff_client):
    rows = [{"instruction": "如何退货？", "input": "", "output": "7天。"}]
    response = staff_client.post(reverse(IMPORT), {"file": _upload(rows), "status": "approved"})
    assert response.status_code == 200
    assert response.context["report"].committed
    assert QAPair.objects.get().status == "approved"
    assert 'class="row-created"' in response.content.decode()


def test_import_page_reports_bad_rows_and_imports_nothing(staff_client):
    rows = [{"instruction": "如何退货？", "output": "7天。"}, {"instruction": "发票", "output": ""}]
    response = staff_client.post(reverse(IMPORT), {"file": _upload(rows)})
    body = response.content.decode()
    assert QAPair.objects.count() == 0
    assert 'class="row-rejected"' in body and "<code>output</code>" in body


def test_import_page_is_refused_without_add_permission(client, customer):
    customer.is_staff = True
    customer.save()
    client.force_login(customer)
    response = client.get(reverse(IMPORT))
    assert response.status_code == 403


def test_import_page_shows_the_warning_of_a_formula_like_csv_cell(staff_client):
    upload = SimpleUploadedFile("hostile.csv", "instruction,output\r\n=1+1,答案\r\n".encode(), content_type="text/csv")
    body = staff_client.post(reverse(IMPORT), {"file": upload}).content.decode()
    assert QAPair.objects.get().instruction == "=1+1"
    assert 'class="import-warning"' in body and "<code>instruction</code>" in body
