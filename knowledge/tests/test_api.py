"""The knowledge REST API: Q&A pairs (CRUD, import, export), categories, permissions, limits."""

import io
import json
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from knowledge.models import Category, QAPair
from knowledge.serializers import QAPairSerializer
from knowledge.tests.factories import make_category, make_pair

pytestmark = [pytest.mark.django_db, pytest.mark.services]

PAIRS = "/api/v1/qa-pairs/"
IMPORT = "/api/v1/qa-pairs/import/"
EXPORT = "/api/v1/qa-pairs/export/"
CATEGORIES = "/api/v1/categories/"


def detail(pair_or_id):
    return f"{PAIRS}{getattr(pair_or_id, 'pk', pair_or_id)}/"


def upload(records, name="pairs.json", **fields):
    """Multipart form data for the import endpoint."""
    if isinstance(records, (bytes, str)):
        content = records.encode() if isinstance(records, str) else records
    else:
        content = json.dumps(records, ensure_ascii=False).encode()
    data = {"file": io.BytesIO(content), **fields}
    data["file"].name = name
    return data


def token_client(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def staff_with(*codenames):
    user = get_user_model().objects.create_user(f"staff-{'-'.join(codenames) or 'none'}", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="knowledge", codename__in=codenames))
    return token_client(user)


def model_messages(**fields):
    """What the model (and so the admin) says about these values, per field."""
    with pytest.raises(ValidationError) as caught:
        pair = QAPair(**fields)
        pair.clean_fields(exclude=["question_hash"])
        pair.clean()
    return caught.value.message_dict


# --- CRUD ---


def test_staff_creates_a_manual_pair_signed_with_their_name(staff_api, staff_user):
    category = make_category("退货")
    response = staff_api.post(
        PAIRS,
        {"instruction": " 如何退货？ ", "input": "", "output": "7天内可无理由退货。", "category": "退货", "split": "train"},
        format="json",
    )

    assert response.status_code == 201, response.json()
    body = response.json()
    pair = QAPair.objects.get(pk=body["id"])
    assert pair.instruction == "如何退货？"
    assert pair.category == category
    assert pair.source == QAPair.Source.MANUAL
    assert pair.status == QAPair.Status.DRAFT
    assert pair.created_by == staff_user and pair.updated_by == staff_user
    assert body["category"] == "退货"
    assert body["created_by"] == body["updated_by"] == "staff"
    assert body["question_hash"] == pair.question_hash and len(body["question_hash"]) == 64


def test_create_ignores_read_only_fields(staff_api):
    response = staff_api.post(
        PAIRS,
        {"instruction": "如何开发票？", "output": "在订单页申请。", "source": "import", "question_hash": "x" * 64},
        format="json",
    )

    assert response.status_code == 201
    pair = QAPair.objects.get(pk=response.json()["id"])
    assert pair.source == QAPair.Source.MANUAL
    assert pair.question_hash != "x" * 64


def test_staff_reads_a_pair(staff_api):
    pair = make_pair(category=make_category("物流"), status=QAPair.Status.APPROVED)

    response = staff_api.get(detail(pair))

    assert response.status_code == 200
    body = response.json()
    assert body["instruction"] == pair.instruction
    assert body["category"] == "物流"
    assert body["status"] == "approved"
    assert body["created_by"] is None
    assert set(body) == {
        "id", "instruction", "input", "output", "alternates", "category", "status", "split", "source",
        "question_hash", "created_at", "updated_at", "created_by", "updated_by",
    }  # fmt: skip


def test_staff_replaces_a_pair_and_becomes_its_updater(staff_api, superuser):
    pair = make_pair(created_by=superuser, updated_by=superuser, category=make_category("旧分类"))

    response = staff_api.put(
        detail(pair),
        {"instruction": "如何换货？", "input": "订单已签收", "output": "签收后15天内可换货。", "category": None},
        format="json",
    )

    assert response.status_code == 200, response.json()
    pair.refresh_from_db()
    assert (pair.instruction, pair.input, pair.output, pair.category) == ("如何换货？", "订单已签收", "签收后15天内可换货。", None)
    assert pair.created_by == superuser
    assert pair.updated_by.username == "staff"


def test_staff_changes_one_field_of_a_pair(staff_api):
    pair = make_pair()

    response = staff_api.patch(detail(pair), {"status": "approved"}, format="json")

    assert response.status_code == 200
    pair.refresh_from_db()
    assert pair.status == QAPair.Status.APPROVED


def test_patch_keeping_the_pairs_own_question_is_not_a_duplicate(staff_api):
    pair = make_pair(instruction="如何退货？")

    response = staff_api.patch(detail(pair), {"instruction": "如何 退货"}, format="json")

    assert response.status_code == 200, response.json()


def test_staff_deletes_a_pair(staff_api):
    pair = make_pair()

    response = staff_api.delete(detail(pair))

    assert response.status_code == 204
    assert not QAPair.objects.filter(pk=pair.pk).exists()


@pytest.mark.parametrize("pair_id", ["999999", "abc", "1.5", "-1"])
def test_an_unknown_or_malformed_id_is_a_json_404(staff_api, pair_id):
    response = staff_api.get(detail(pair_id))

    assert response.status_code == 404
    assert "detail" in response.json()


# --- Validation: the model's rules, field by field ---


def test_blank_output_is_refused_on_the_output_field_with_the_models_message(staff_api):
    response = staff_api.post(PAIRS, {"instruction": "如何退货？", "output": "   "}, format="json")

    assert response.status_code == 400
    assert set(response.json()) == {"output"}
    assert response.json()["output"] == model_messages(instruction="如何退货？", output="")["output"]
    assert QAPair.objects.count() == 0


def test_missing_instruction_is_refused_on_the_instruction_field(staff_api):
    response = staff_api.post(PAIRS, {"output": "答案"}, format="json")

    assert response.status_code == 400
    assert "instruction" in response.json()


def test_question_without_letters_or_digits_is_refused(staff_api):
    response = staff_api.post(PAIRS, {"instruction": "？？！", "output": "答案"}, format="json")

    assert response.status_code == 400
    assert response.json()["instruction"] == model_messages(instruction="？？！", output="答案")["instruction"]


def test_duplicate_question_is_refused_naming_the_existing_pair(staff_api):
    existing = make_pair(instruction="如何退货？")

    response = staff_api.post(PAIRS, {"instruction": "用户问：如何 退货", "output": "另一个答案"}, format="json")

    assert response.status_code == 400
    [message] = response.json()["instruction"]
    assert f"#{existing.pk}" in message
    assert QAPair.objects.count() == 1


def test_changing_a_question_into_another_pairs_question_is_refused(staff_api):
    existing = make_pair(instruction="如何退货？")
    other = make_pair(instruction="如何换货？")

    response = staff_api.patch(detail(other), {"instruction": "如何退货"}, format="json")

    assert response.status_code == 400
    assert f"#{existing.pk}" in response.json()["instruction"][0]
    other.refresh_from_db()
    assert other.instruction == "如何换货？"


def test_a_question_stored_by_someone_else_after_validation_is_still_a_400_not_a_500(staff_user):
    serializer = QAPairSerializer(data={"instruction": "如何退货？", "output": "答案"})
    assert serializer.is_valid(), serializer.errors
    existing = make_pair(instruction="如何 退货")  # a concurrent request wins the race

    with pytest.raises(serializers.ValidationError) as caught:
        serializer.save(created_by=staff_user)

    assert f"#{existing.pk}" in str(caught.value.detail["instruction"][0])
    assert QAPair.objects.count() == 1


def test_an_empty_category_means_none(staff_api):
    pair = make_pair(category=make_category("售后"))

    response = staff_api.patch(detail(pair), {"category": ""}, format="json")

    assert response.status_code == 200
    assert response.json()["category"] is None
    pair.refresh_from_db()
    assert pair.category is None


def test_unknown_category_is_refused_on_the_category_field(staff_api):
    response = staff_api.post(PAIRS, {"instruction": "如何退货？", "output": "答案", "category": "没有这个"}, format="json")

    assert response.status_code == 400
    assert set(response.json()) == {"category"}
    assert "没有这个" in response.json()["category"][0]


def test_overlong_instruction_is_refused(staff_api):
    response = staff_api.post(PAIRS, {"instruction": "问" * 2001, "output": "答案"}, format="json")

    assert response.status_code == 400
    assert "instruction" in response.json()


def test_unknown_status_is_refused_on_the_status_field(staff_api):
    response = staff_api.post(PAIRS, {"instruction": "如何退货？", "output": "答案", "status": "published"}, format="json")

    assert response.status_code == 400
    assert "status" in response.json()


# --- Malformed requests are 4xx JSON, never 500 ---


def test_malformed_json_is_400_json(staff_api):
    response = staff_api.post(PAIRS, '{"instruction": "如何退货？", ', content_type="application/json")

    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/json")
    assert "detail" in response.json()


def test_text_plain_body_is_415(staff_api):
    response = staff_api.post(PAIRS, "instruction=如何退货", content_type="text/plain")

    assert response.status_code == 415
    assert "detail" in response.json()


def test_body_over_the_upload_limit_is_refused_as_json(staff_api):
    size = settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1024 * 1024
    body = json.dumps({"instruction": "如何退货？", "output": "x" * size})

    response = staff_api.post(PAIRS, body, content_type="application/json")

    assert response.status_code in (400, 413)
    assert "detail" in response.json() or "output" in response.json()
    assert QAPair.objects.count() == 0


# --- Permissions: Q&A drafts are internal ---


@pytest.fixture
def objects():
    category = make_category("售后")
    return {"pair": make_pair(category=category), "category": category}


def _endpoints(objects):
    pair, category = objects["pair"], objects["category"]
    new_pair = {"instruction": "新问题怎么办？", "output": "新答案。"}
    return {
        "list": ("get", PAIRS, None, None),
        "retrieve": ("get", detail(pair), None, None),
        "create": ("post", PAIRS, new_pair, "json"),
        "update": ("put", detail(pair), new_pair, "json"),
        "partial_update": ("patch", detail(pair), {"status": "approved"}, "json"),
        "destroy": ("delete", detail(pair), None, None),
        "import": ("post", IMPORT, upload([{"instruction": "导入的问题？", "output": "导入的答案。"}]), "multipart"),
        "export": ("get", EXPORT, {"file_format": "jsonl"}, None),
        "categories_list": ("get", CATEGORIES, None, None),
        "categories_retrieve": ("get", f"{CATEGORIES}{category.pk}/", None, None),
        "categories_create": ("post", CATEGORIES, {"name": "新分类"}, "json"),
        "categories_update": ("put", f"{CATEGORIES}{category.pk}/", {"name": "改名", "description": "说明"}, "json"),
        "categories_partial_update": ("patch", f"{CATEGORIES}{category.pk}/", {"description": "说明"}, "json"),
        "categories_destroy": ("delete", f"{CATEGORIES}{category.pk}/", None, None),
    }


ENDPOINTS = [
    "list", "retrieve", "create", "update", "partial_update", "destroy", "import", "export",
    "categories_list", "categories_retrieve", "categories_create", "categories_update",
    "categories_partial_update", "categories_destroy",
]  # fmt: skip


def call(client, endpoint, objects):
    method, url, data, fmt = _endpoints(objects)[endpoint]
    return getattr(client, method)(url, data, format=fmt) if fmt else getattr(client, method)(url, data)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_anonymous_requests_are_refused_with_401(anon_api, objects, endpoint):
    response = call(anon_api, endpoint, objects)

    assert response.status_code == 401
    assert "detail" in response.json()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_customers_are_refused_with_403(customer_api, objects, endpoint):
    response = call(customer_api, endpoint, objects)

    assert response.status_code == 403


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_staff_with_model_permissions_may_do_everything(staff_api, objects, endpoint):
    response = call(staff_api, endpoint, objects)

    assert 200 <= response.status_code < 300, response.content


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_superusers_may_do_everything(superuser_api, objects, endpoint):
    response = call(superuser_api, endpoint, objects)

    assert 200 <= response.status_code < 300, response.content


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_staff_without_model_permissions_are_refused_with_403(objects, endpoint):
    response = call(staff_with(), endpoint, objects)

    assert response.status_code == 403


def test_a_customer_given_model_permissions_is_still_refused(customer, objects):
    customer.user_permissions.set(Permission.objects.filter(content_type__app_label="knowledge"))

    response = call(token_client(customer), "list", objects)

    assert response.status_code == 403


def test_view_permission_allows_reading_and_export_but_not_writing(objects):
    client = staff_with("view_qapair")

    assert call(client, "list", objects).status_code == 200
    assert call(client, "export", objects).status_code == 200
    assert call(client, "create", objects).status_code == 403
    assert call(client, "categories_list", objects).status_code == 403


def test_add_permission_alone_does_not_allow_import(objects):
    client = staff_with("view_qapair", "add_qapair")

    assert call(client, "create", objects).status_code == 201
    assert call(client, "import", objects).status_code == 403


def test_add_and_change_permissions_allow_import(objects):
    response = call(staff_with("add_qapair", "change_qapair"), "import", objects)

    assert response.status_code == 201


# --- Import ---


def test_import_of_a_good_json_file_creates_the_pairs(staff_api, staff_user):
    records = [
        {"instruction": "如何退货？", "input": "", "output": "7天内可退货。", "category": "售后"},
        {"instruction": "运费谁出？", "output": "质量问题由我们承担。", "split": "dev", "status": "approved"},
    ]

    response = staff_api.post(IMPORT, upload(records), format="multipart")

    assert response.status_code == 201, response.json()
    report = response.json()
    assert report["committed"] is True and report["ok"] is True and report["format"] == "json"
    assert report["counts"] == {"created": 2, "updated": 0, "skipped": 0, "rejected": 0}
    assert QAPair.objects.count() == 2
    freight = QAPair.objects.get(instruction="运费谁出？")
    assert (freight.split, freight.status, freight.source) == ("dev", "approved", "import")
    assert freight.created_by == staff_user
    assert QAPair.objects.get(instruction="如何退货？").category.name == "售后"


def test_import_with_a_bad_row_writes_nothing_and_names_the_row_and_field(staff_api):
    make_pair()
    before = QAPair.objects.count()
    records = [
        {"instruction": "如何退货？", "output": "7天内可退货。"},
        {"instruction": "如何换货？", "output": ""},
        {"instruction": "如何开票？", "output": "在订单页申请。"},
    ]

    response = staff_api.post(IMPORT, upload(records), format="multipart")

    assert response.status_code == 400
    report = response.json()
    assert report["committed"] is False and report["ok"] is False
    [bad] = [row for row in report["rows"] if row["action"] == "rejected"]
    assert bad["row"] == 2
    assert "output" in bad["errors"]
    assert QAPair.objects.count() == before


def test_import_of_an_unreadable_file_is_400_with_the_files_error(staff_api):
    response = staff_api.post(IMPORT, upload("[{not json", name="pairs.json"), format="multipart")

    assert response.status_code == 400
    assert response.json()["file_error"]
    assert QAPair.objects.count() == 0


def test_import_dry_run_reports_but_writes_nothing(staff_api):
    response = staff_api.post(
        IMPORT, upload([{"instruction": "如何退货？", "output": "7天内可退货。"}], dry_run="true"), format="multipart"
    )

    assert response.status_code == 200
    assert response.json()["dry_run"] is True and response.json()["committed"] is False
    assert response.json()["counts"]["created"] == 1
    assert QAPair.objects.count() == 0


def test_import_without_a_file_is_400_on_the_file_field(staff_api):
    response = staff_api.post(IMPORT, {"status": "draft"}, format="multipart")

    assert response.status_code == 400
    assert "file" in response.json()


def test_import_as_a_json_body_is_415(staff_api):
    response = staff_api.post(IMPORT, [{"instruction": "如何退货？", "output": "7天内。"}], format="json")

    assert response.status_code == 415


def test_import_reads_csv_and_applies_the_given_status_and_split(staff_api):
    csv_text = "instruction,output,category\n如何退货？,7天内可退货。,售后\n"

    response = staff_api.post(
        IMPORT, upload(csv_text, name="pairs.txt", format="csv", status="approved", split="train"), format="multipart"
    )

    assert response.status_code == 201, response.json()
    pair = QAPair.objects.get()
    assert (pair.status, pair.split, pair.category.name) == ("approved", "train", "售后")


def test_import_of_a_file_with_an_unknown_suffix_and_no_format_is_400(staff_api):
    response = staff_api.post(IMPORT, upload("instruction,output\n问,答\n", name="pairs.txt"), format="multipart")

    assert response.status_code == 400
    assert response.json()["file_error"]


# --- Export ---


def test_export_is_a_file_download_of_the_filtered_pairs(staff_api):
    approved = make_pair(status=QAPair.Status.APPROVED)
    make_pair(status=QAPair.Status.DRAFT)

    response = staff_api.get(EXPORT, {"file_format": "jsonl", "status": "approved"})

    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson; charset=utf-8"
    assert response["Content-Disposition"].startswith("attachment;")
    assert ".jsonl" in response["Content-Disposition"]
    records = [json.loads(line) for line in response.content.decode().splitlines()]
    assert [record["id"] for record in records] == [approved.pk]


@pytest.mark.parametrize("file_format", ["json", "csv"])
def test_export_uses_the_formats_content_type(staff_api, file_format):
    make_pair()

    response = staff_api.get(EXPORT, {"file_format": file_format})

    assert response.status_code == 200
    assert response["Content-Type"] == {"json": "application/json; charset=utf-8", "csv": "text/csv; charset=utf-8"}[
        file_format
    ]


def test_export_with_an_unknown_file_format_is_400_json(staff_api):
    response = staff_api.get(EXPORT, {"file_format": "xlsx"})

    assert response.status_code == 400
    assert "file_format" in response.json()


def test_export_then_import_is_lossless(staff_api):
    after_sales, shipping = make_category("售后"), make_category("物流")
    make_pair(instruction="如何退货？", input="订单号 123", output="7天内可退货，运费自理。", category=after_sales)
    make_pair(instruction="多久发货？", output="付款后48小时内发货。", category=shipping, split="dev", status="approved")
    make_pair(instruction="能开发票吗？", output="可以，在订单页申请。\n电子发票当天开出。", split="train", status="archived")
    fields = ("instruction", "input", "output", "category__name", "split", "status")
    before = sorted(QAPair.objects.values_list(*fields))

    exported = staff_api.get(EXPORT, {"file_format": "jsonl"})
    QAPair.objects.all().delete()
    response = staff_api.post(IMPORT, upload(exported.content, name="export.jsonl"), format="multipart")

    assert response.status_code == 201, response.json()
    assert sorted(QAPair.objects.values_list(*fields)) == before


# --- Search, filters, ordering, pagination ---


def ids(response):
    assert response.status_code == 200, response.json()
    return [item["id"] for item in response.json()["results"]]


def test_search_matches_the_question_and_the_answer(staff_api):
    by_question = make_pair(instruction="如何退货？", output="请联系客服。")
    by_answer = make_pair(instruction="收到坏的东西怎么办？", output="可以申请退货。")
    make_pair(instruction="多久发货？", output="48小时内。")

    assert set(ids(staff_api.get(PAIRS, {"search": "退货"}))) == {by_question.pk, by_answer.pk}


def test_filters_by_status_split_source_and_category(staff_api):
    target = make_pair(status="approved", split="dev", source="import", category=make_category("售后"))
    make_pair(status="approved", split="dev", source="import")
    make_pair(status="draft", split="dev", source="import", category=Category.objects.get(name="售后"))
    make_pair(status="approved", split="train", source="manual", category=Category.objects.get(name="售后"))

    assert set(ids(staff_api.get(PAIRS, {"status": "approved", "split": "dev", "source": "import"}))) == {
        target.pk,
        QAPair.objects.filter(category=None).get().pk,
    }
    assert ids(staff_api.get(PAIRS, {"status": "approved", "split": "dev", "category": "售后"})) == [target.pk]


def test_filters_by_creation_time(staff_api):
    old, new = make_pair(), make_pair()
    QAPair.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=10))
    cutoff = (timezone.now() - timedelta(days=1)).isoformat()

    assert ids(staff_api.get(PAIRS, {"created_at_after": cutoff})) == [new.pk]
    assert ids(staff_api.get(PAIRS, {"created_at_before": cutoff})) == [old.pk]


def test_a_bad_filter_value_is_400_on_that_filter(staff_api):
    response = staff_api.get(PAIRS, {"status": "published"})

    assert response.status_code == 400
    assert "status" in response.json()


def test_a_search_with_a_nul_character_is_400_not_500(staff_api):
    response = staff_api.get(PAIRS, {"search": "退\x00货"})

    assert response.status_code == 400


def test_orders_by_id_either_way(staff_api):
    pairs = [make_pair().pk for _ in range(3)]

    assert ids(staff_api.get(PAIRS, {"ordering": "id"})) == pairs
    assert ids(staff_api.get(PAIRS, {"ordering": "-id"})) == pairs[::-1]


def test_orders_by_status(staff_api):
    archived = make_pair(status="archived").pk
    approved = make_pair(status="approved").pk
    draft = make_pair(status="draft").pk

    assert ids(staff_api.get(PAIRS, {"ordering": "status,id"})) == [approved, archived, draft]


@override_settings(CSP_API_MAX_PAGE_SIZE=3)
def test_page_size_is_capped(staff_api):
    for _ in range(5):
        make_pair()

    response = staff_api.get(PAIRS, {"page_size": 100000})

    assert response.json()["count"] == 5
    assert len(response.json()["results"]) == 3


def test_page_size_is_capped_by_the_configured_maximum(staff_api):
    QAPair.objects.bulk_create(
        QAPair(instruction=f"问题{n}", output="答", question_hash=f"{n:064d}")
        for n in range(settings.CSP_API_MAX_PAGE_SIZE + 1)
    )

    response = staff_api.get(PAIRS, {"page_size": 100000})

    assert len(response.json()["results"]) == settings.CSP_API_MAX_PAGE_SIZE
    assert response.json()["next"]


# --- Categories ---


def test_categories_show_how_many_pairs_they_hold(staff_api):
    category = make_category("售后")
    make_pair(category=category)
    make_pair(category=category)
    make_category("空的")

    response = staff_api.get(CATEGORIES)

    assert response.status_code == 200
    counts = {item["name"]: item["pair_count"] for item in response.json()["results"]}
    assert counts == {"售后": 2, "空的": 0}


def test_category_names_are_unique(staff_api):
    make_category("售后")

    response = staff_api.post(CATEGORIES, {"name": "售后"}, format="json")

    assert response.status_code == 400
    assert "name" in response.json()


def test_deleting_a_category_keeps_its_pairs(staff_api):
    category = make_category("售后")
    pair = make_pair(category=category)

    response = staff_api.delete(f"{CATEGORIES}{category.pk}/")

    assert response.status_code == 204
    pair.refresh_from_db()
    assert pair.category is None


# --- Throttling ---


@override_settings(CSP_API_THROTTLE_RATES={"anon": "2/min", "user": "3/min"})
def test_the_fourth_request_in_a_minute_is_throttled_with_retry_after(staff_api):
    statuses = [staff_api.get(PAIRS).status_code for _ in range(3)]

    response = staff_api.get(PAIRS)

    assert statuses == [200, 200, 200]
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 0
    assert "detail" in response.json()


def test_api_writes_are_recorded_in_the_admin_history(staff_api, staff_user):
    from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry

    pair_id = staff_api.post("/api/v1/qa-pairs/", {"instruction": "历史记录问题？", "output": "答案。"}, format="json").json()["id"]
    staff_api.patch(f"/api/v1/qa-pairs/{pair_id}/", {"output": "新答案。"}, format="json")
    staff_api.delete(f"/api/v1/qa-pairs/{pair_id}/")
    flags = list(LogEntry.objects.filter(user=staff_user, object_id=str(pair_id)).order_by("id").values_list("action_flag", flat=True))
    assert flags == [ADDITION, CHANGE, DELETION]
