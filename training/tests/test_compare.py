"""Two adapter versions compared: their metrics side by side with the better one named, and per
dev question both answers with the reference's key facts each stated or missed; as an admin page,
its JSON, and the API's; for staff only."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from llm.evaluation import answer_as_served, evaluate_served
from llm.grounding import Thresholds
from llm.retrieval import Hit
from training.compare import GOT, OTHER, version_comparison
from training.tests.factories import make_adapter_version

pytestmark = pytest.mark.django_db

RETURNS = "您好！支持7天无理由退货。"
SHIPPING = "您好！下单后1-3天发货，运费10元。"
FREE_OVER = "满99元包邮。"
THRESHOLDS = Thresholds(curated=0.95, fallback=0.5)  # the hits below (0.8) are answered grounded

# Each dev question with the pairs retrieved for it and its reference answer.
DEV = {
    "能退货吗": ((Hit(pair_id=1, rank=1, score=0.8, fused=0.0, question="能退货吗？", answer=RETURNS),), RETURNS),
    "几天发货": (
        (
            Hit(pair_id=2, rank=1, score=0.8, fused=0.0, question="几天发货？", answer=SHIPPING),
            Hit(pair_id=3, rank=2, score=0.6, fused=0.0, question="包邮吗？", answer=FREE_OVER),
        ),
        SHIPPING,
    ),
}


def evaluated(answers):
    """A version's stored evaluation as its run writes it (training.grounding.evaluate_served):
    `answers` maps each dev question to what the adapter generated for it."""
    served = [
        answer_as_served(question, DEV[question][0], THRESHOLDS, can_ground=True, generate=lambda prompt, text=text: text)
        for question, text in answers.items()
    ]
    references = [DEV[question][1] for question in answers]
    results = evaluate_served(served, references)
    results["samples"] = [
        {"question": a.question, "reference": ref, "prediction": a.text, "mode": a.mode} for a, ref in zip(served, references)
    ]
    return results


@pytest.fixture
def versions(tmp_path):
    """v1 states every key fact; v2 misses the shipping fee and adds the free-shipping bar (a
    number of a retrieved pair, so the fact guard lets it through)."""
    v1 = make_adapter_version(
        "v1", path=tmp_path / "v1", metrics={"eval": evaluated({"能退货吗": "支持7天无理由退货。", "几天发货": "下单后1~3天发货，运费10元。"})}
    )
    v2 = make_adapter_version(
        "v2", path=tmp_path / "v2", beside=v1,
        metrics={"eval": evaluated({"能退货吗": "支持7天无理由退货。", "几天发货": "下单后1-3天发货，满99元包邮。"})},
    )
    return v1, v2


def _row(comparison, question):
    return next(row for row in comparison["questions"] if row["question"] == question)


def test_each_metric_is_side_by_side_with_the_better_version_named(versions):
    v1, v2 = versions
    metrics = {row["name"]: row for row in version_comparison(v1, v2)["metrics"]}
    assert metrics["key_fact_recall"]["a"] == 1.0 and metrics["key_fact_recall"]["b"] == pytest.approx(2 / 3)
    assert metrics["key_fact_recall"]["better"] == "a"
    assert {k: metrics["invented_number_share"][k] for k in ("a", "b", "better")} == {"a": 0.0, "b": 0.0, "better": None}
    assert "dev_loss" not in metrics  # neither run measured it: no row of dashes
    swapped = {row["name"]: row for row in version_comparison(v2, v1)["metrics"]}
    assert swapped["key_fact_recall"]["better"] == "b"


def test_a_lower_dev_loss_and_fewer_invented_numbers_are_better():
    from training.compare import better_of

    assert better_of("dev_loss", 1.2, 1.5) == "a"
    assert better_of("invented_number_share", 0.1, 0.0) == "b"
    assert better_of("rouge_l_char", 0.4, 0.6) == "b"
    assert better_of("rouge_l_char", 0.4, None) is None


def test_each_dev_question_pairs_both_answers_with_the_key_facts_each_stated_and_missed(versions):
    v1, v2 = versions
    comparison = version_comparison(v1, v2)
    assert [row["question"] for row in comparison["questions"]] == ["能退货吗", "几天发货"]
    shipping = _row(comparison, "几天发货")
    assert shipping["key_facts"] == ["1-3天", "10元"]
    assert shipping["a"]["facts_got"] == ["1-3天", "10元"] and shipping["a"]["facts_missed"] == []
    assert shipping["b"]["facts_got"] == ["1-3天"] and shipping["b"]["facts_missed"] == ["10元"]
    assert shipping["b"]["other_numbers"] == ["99元"] and shipping["b"]["mode"] == "grounded"
    # The pieces put the answer back together, its facts marked (the "~" range as written, normalised).
    assert "".join(text for text, _mark in shipping["a"]["pieces"]) == "下单后1~3天发货,运费10元。"
    assert [(text, mark) for text, mark in shipping["a"]["pieces"] if mark] == [("1~3天", GOT), ("10元", GOT)]
    assert [(text, mark) for text, mark in shipping["b"]["pieces"] if mark] == [("1-3天", GOT), ("99元", OTHER)]


def test_a_question_only_one_version_was_asked_has_an_empty_side(versions, tmp_path):
    v1, _v2 = versions
    v3 = make_adapter_version("v3", path=tmp_path / "v3", beside=v1, metrics={"eval": evaluated({"几天发货": "下单后1-3天发货。"})})
    comparison = version_comparison(v3, v1)
    assert [row["question"] for row in comparison["questions"]] == ["几天发货", "能退货吗"]
    returns = _row(comparison, "能退货吗")
    assert returns["a"] is None and returns["b"]["facts_got"] == ["7天"]


def test_a_version_without_an_evaluation_compares_as_not_measured(versions, tmp_path):
    v1, _v2 = versions
    bare = make_adapter_version("v0", path=tmp_path / "v0", beside=v1, metrics={})
    comparison = version_comparison(bare, v1)
    assert comparison["a"]["evaluated"] is False
    assert all(row["a"] is None and row["better"] is None for row in comparison["metrics"])
    assert all(row["a"] is None for row in comparison["questions"])


def _page_url(a, b, **extra):
    query = "&".join(f"{key}={value}" for key, value in {"a": a.pk, "b": b.pk, **extra}.items())
    return f"{reverse('admin:training_adapterversion_compare')}?{query}"


def test_the_admin_page_shows_both_answers_with_the_stated_facts_marked_and_the_missed_ones_named(versions, staff_client):
    v1, v2 = versions
    page = staff_client.get(_page_url(v1, v2), HTTP_ACCEPT_LANGUAGE="en")
    assert page.status_code == 200
    html = page.content.decode()
    assert "v1 and v2 compared" in html
    assert '<mark class="fact-got">10元</mark>' in html and '<mark class="fact-other">99元</mark>' in html
    assert "missed: 10元" in html
    assert '<td class="better">1.000</td>' in html  # v1's key-fact recall
    assert _page_url(v2, v1) in html.replace("&amp;", "&")  # swap


def test_the_same_url_with_format_json_gives_the_comparison(versions, staff_client):
    v1, v2 = versions
    response = staff_client.get(_page_url(v1, v2, format="json"))
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    body = json.loads(response.content)
    assert body == json.loads(json.dumps(version_comparison(v1, v2)))
    assert body["a"]["name"] == "v1" and _row(body, "几天发货")["b"]["facts_missed"] == ["10元"]


def test_the_api_gives_the_comparison_to_staff_only(versions, staff_api, customer_api, anon_api):
    v1, v2 = versions
    url = f"/api/v1/adapter-versions/compare/?a={v1.pk}&b={v2.pk}"
    response = staff_api.get(url)
    assert response.status_code == 200 and response.json()["b"]["name"] == "v2"
    assert customer_api.get(url).status_code == 403
    assert anon_api.get(url).status_code in (401, 403)
    assert staff_api.get("/api/v1/adapter-versions/compare/?a=1").status_code == 400
    assert staff_api.get(f"/api/v1/adapter-versions/compare/?a={v1.pk}&b=999999").status_code == 404


def test_the_page_is_for_staff_who_may_view_versions(versions, client):
    v1, v2 = versions
    customer = get_user_model().objects.create_user("someone", password="pass-12345")
    client.force_login(customer)
    response = client.get(_page_url(v1, v2, format="json"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]  # not staff: the admin's login
    customer.is_staff = True
    customer.save()
    assert client.get(_page_url(v1, v2)).status_code == 403  # staff without the view permission on versions


def test_a_missing_or_unknown_version_is_refused(versions, staff_client):
    v1, _v2 = versions
    url = reverse("admin:training_adapterversion_compare")
    assert staff_client.get(f"{url}?a={v1.pk}").status_code == 404
    assert staff_client.get(f"{url}?a={v1.pk}&b=x&format=json").status_code == 400
    assert staff_client.get(f"{url}?a={v1.pk}&b=999999&format=json").status_code == 404


def test_the_version_list_action_opens_the_page_for_exactly_two_versions(versions, staff_client):
    v1, v2 = versions
    changelist = reverse("admin:training_adapterversion_changelist")
    response = staff_client.post(changelist, {"action": "compare", "_selected_action": [v2.pk, v1.pk]})
    assert response.status_code == 302 and response["Location"] == _page_url(v1, v2)  # the older one is A
    response = staff_client.post(changelist, {"action": "compare", "_selected_action": [v1.pk]}, follow=True, HTTP_ACCEPT_LANGUAGE="en")
    assert "Select exactly two versions to compare." in response.content.decode()
