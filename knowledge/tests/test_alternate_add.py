"""Teaching a pair a customer's paraphrase (issue #13): knowledge.services.qa_alternate_add and
POST /api/v1/qa-pairs/{id}/alternates/."""

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError

from knowledge import retrieval
from knowledge.models import ALTERNATE_MAX_LENGTH, ALTERNATES_MAX, QAPair
from knowledge.services import qa_alternate_add
from knowledge.tests.factories import make_pair

pytestmark = pytest.mark.django_db

APPROVED = QAPair.Status.APPROVED


@pytest.fixture
def refund():
    return make_pair("用户问：如何退货？", "签收后7天内可无理由退货。", status=APPROVED, alternates=["东西不想要了能退吗"])


@pytest.fixture
def shipping():
    return make_pair("用户问：发货需要多久？", "现货24小时内发货。", status=APPROVED, alternates=["几天能发货"])


def test_a_customer_question_is_added_stripped_and_logged(refund, staff_user):
    pair = qa_alternate_add(pair=refund, question="  买错了可以退吗？ \n", user=staff_user)

    assert pair.alternates == ["东西不想要了能退吗", "买错了可以退吗？"]
    refund.refresh_from_db()
    assert refund.alternates == pair.alternates and refund.updated_by == staff_user
    entry = LogEntry.objects.get(object_id=str(refund.pk))
    assert entry.action_flag == CHANGE and entry.user == staff_user and "买错了可以退吗？" in entry.change_message


def test_the_pairs_own_question_or_alternate_changes_nothing(refund, staff_user):
    before = refund.updated_at
    for same in ("如何退货", "用户问：如何退货？", "东西不想要了，能退吗？", "东西不想要了能退吗"):
        assert qa_alternate_add(pair=refund, question=same, user=staff_user).alternates == ["东西不想要了能退吗"]
    refund.refresh_from_db()
    assert refund.alternates == ["东西不想要了能退吗"] and refund.updated_at == before
    assert not LogEntry.objects.exists()


def test_another_pairs_question_or_alternate_is_refused_naming_that_pair(refund, shipping):
    with pytest.raises(ValidationError) as question:
        qa_alternate_add(pair=refund, question="发货需要多久？")
    with pytest.raises(ValidationError) as alternate:
        qa_alternate_add(pair=refund, question="几天能发货？")

    assert question.value.message_dict == {"question": [f"“发货需要多久？” is already the question of pair #{shipping.pk}."]}
    assert alternate.value.message_dict == {"question": [f"“几天能发货？” is already an alternate question of pair #{shipping.pk}."]}
    refund.refresh_from_db()
    assert refund.alternates == ["东西不想要了能退吗"]


def test_an_empty_or_too_long_question_is_refused(refund):
    for text, message in (("？！ ", "is empty"), ("退" * (ALTERNATE_MAX_LENGTH + 1), f"at most {ALTERNATE_MAX_LENGTH}"), ("a || b", "contains ||")):
        with pytest.raises(ValidationError) as refused:
            qa_alternate_add(pair=refund, question=text)
        assert message in " ".join(refused.value.message_dict["question"])
    refund.refresh_from_db()
    assert refund.alternates == ["东西不想要了能退吗"]


def test_a_pair_with_the_most_alternates_takes_no_more(refund):
    refund.alternates = [f"第{n}种退货问法" for n in range(ALTERNATES_MAX)]
    refund.save()
    with pytest.raises(ValidationError) as refused:
        qa_alternate_add(pair=refund, question="买错了可以退吗")
    assert refused.value.message_dict["question"] == [f"At most {ALTERNATES_MAX} alternate questions (this has {ALTERNATES_MAX + 1})."]
    refund.refresh_from_db()
    assert len(refund.alternates) == ALTERNATES_MAX


def test_the_serving_index_retrieves_the_new_alternate_at_once(fresh_process, refund, shipping, staff_user):
    paraphrase = "快递什么时候能寄出来"
    before = retrieval.serving_index()
    assert before.entry(shipping.pk).alternates == ("几天能发货",)

    qa_alternate_add(pair=shipping, question=paraphrase, user=staff_user)

    after = retrieval.serving_index()
    assert after is not before and after.entry(shipping.pk).alternates == ("几天能发货", paraphrase)
    best = after.search(paraphrase, k=2)[0]
    assert best.pair_id == shipping.pk and best.score == pytest.approx(1.0, abs=1e-3)


# --- POST /api/v1/qa-pairs/{id}/alternates/ ---


def _url(pair):
    return f"/api/v1/qa-pairs/{pair.pk}/alternates/"


def test_the_api_adds_an_alternate_and_answers_with_the_pair(staff_api, refund):
    response = staff_api.post(_url(refund), {"question": " 买错了可以退吗 "}, format="json")

    assert response.status_code == 200
    assert response.json()["id"] == refund.pk and response.json()["alternates"] == ["东西不想要了能退吗", "买错了可以退吗"]
    assert response.json()["updated_by"] == "staff"
    again = staff_api.post(_url(refund), {"question": "买错了可以退吗？"}, format="json")
    assert again.status_code == 200 and again.json()["alternates"] == ["东西不想要了能退吗", "买错了可以退吗"]


def test_the_api_refuses_a_bad_question_by_field(staff_api, refund, shipping):
    taken = staff_api.post(_url(refund), {"question": "几天能发货"}, format="json", HTTP_ACCEPT_LANGUAGE="en")
    blank = staff_api.post(_url(refund), {"question": "  "}, format="json")
    number = staff_api.post(_url(refund), {"question": 7}, format="json")
    missing = staff_api.post(_url(refund), {}, format="json")

    assert taken.status_code == 400 and taken.json() == {"question": [f"“几天能发货” is already an alternate question of pair #{shipping.pk}."]}
    assert all(response.status_code == 400 and list(response.json()) == ["question"] for response in (blank, number, missing))
    assert staff_api.post("/api/v1/qa-pairs/999999/alternates/", {"question": "x"}, format="json").status_code == 404
    refund.refresh_from_db()
    assert refund.alternates == ["东西不想要了能退吗"]


def test_the_api_needs_the_permission_to_change_pairs(staff_api, staff_user, customer_api, anon_api, refund):
    staff_user.user_permissions.remove(Permission.objects.get(codename="change_qapair"))

    assert staff_api.post(_url(refund), {"question": "买错了可以退吗"}, format="json").status_code == 403
    assert customer_api.post(_url(refund), {"question": "买错了可以退吗"}, format="json").status_code == 403
    assert anon_api.post(_url(refund), {"question": "买错了可以退吗"}, format="json").status_code in (401, 403)
    refund.refresh_from_db()
    assert refund.alternates == ["东西不想要了能退吗"]


def test_the_openapi_schema_documents_the_operation(staff_api):
    schema = staff_api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()

    operation = schema["paths"]["/api/v1/qa-pairs/{id}/alternates/"]["post"]
    assert set(operation["responses"]) >= {"200", "400"}
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert schema["components"]["schemas"][body]["required"] == ["question"]
