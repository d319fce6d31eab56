"""A canary rollout seen from the APIs: the analytics JSON carries its split as the page shows it,
and the OpenAI-compatible API routes a request for the active version as the chat routes a new
conversation (a customer cannot name the canary; staff naming a version get exactly it)."""

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token

from chat import analytics
from chat.models import Conversation, Message
from training import canary as rollout
from training.tests.factories import make_adapter_version

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_versions(tmp_path):
    """v1 active, v2 beside it (rows only: their adapters are not read)."""
    v1 = make_adapter_version("v1", path=tmp_path / "v1", is_active=True, activated_at=timezone.now())
    return v1, make_adapter_version("v2", path=tmp_path / "v2", beside=v1)


# --- the analytics JSON ---


def test_the_analytics_json_has_no_rollout_before_any_canary(two_versions, staff_api):
    response = staff_api.get("/api/v1/analytics/")
    assert response.status_code == 200 and response.json()["rollout"] is None


def test_the_analytics_json_gives_the_canarys_two_sides_as_the_page_does(two_versions, staff_api, customer):
    v1, v2 = two_versions
    rollout.canary_start(version=v2, percent=25)
    for side, version, rating in (("active", v1, 1), ("active", v1, -1), ("canary", v2, 1)):
        conversation = Conversation.objects.create(user=customer, rollout=side, adapter_version=version)
        Message.objects.create(
            conversation=conversation, role="assistant", text="…", adapter_version=version, adapter_name=version.name,
            rating=rating, mode="grounded", finish_reason="stop", latency_ms=200, first_token_ms=20,
        )

    body = staff_api.get("/api/v1/analytics/").json()["rollout"]
    assert (body["canary"], body["running"], body["percent"]) == ("v2", True, 25)
    on_active, on_canary = body["sides"]
    assert (on_active["side"], on_active["versions"], on_active["answers"], on_active["thumbs_up_rate"]) == ("active", ["v1"], 2, 0.5)
    assert (on_canary["side"], on_canary["versions"], on_canary["answers"], on_canary["thumbs_up_rate"]) == ("canary", ["v2"], 1, 1.0)
    assert on_canary["fallback_share"] == 0.0 and on_canary["guard_share"] == 0.0
    assert "version" not in on_active  # a side lists its versions instead
    report = analytics.rollout_report()
    assert (body["since"], body["sides"]) == (report["since"], report["sides"])

    rollout.canary_stop()  # stays readable after it ended
    assert staff_api.get("/api/v1/analytics/").json()["rollout"]["running"] is False


def test_the_schema_documents_the_rollout(staff_api):
    schema = staff_api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    components = schema["components"]["schemas"]
    assert components["Analytics"]["properties"]["rollout"]["nullable"] is True
    side = components["RolloutSide"]["properties"]
    assert {"side", "versions", "fallback_share", "guard_share", "thumbs_up_rate", "handoff_rate"} <= set(side)
    assert "version" not in side


# --- the OpenAI-compatible API, answered by the tiny model (in process) ---


@pytest.fixture
def canary_ready(serving, second_adapter):
    """v1 (the trained adapter) active, v2 (barely trained) the canary on every new conversation."""
    v2 = make_adapter_version("v2", path=second_adapter, beside=serving)
    rollout.canary_start(version=v2, percent=100)
    return serving, v2


def _complete(user, model, question):
    """POST /v1/chat/completions as `user`: (status, body)."""
    key = Token.objects.get_or_create(user=user)[0].key
    body = {"model": model, "messages": [{"role": "user", "content": question}]}
    response = Client().post("/v1/chat/completions", body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}")
    return response.status_code, response.json()


@pytest.mark.parametrize("model", ["default", "v1"])
def test_a_customers_request_for_the_active_version_is_routed_by_the_canary(canary_ready, customer, faq, model):
    status, body = _complete(customer, model, faq[0]["instruction"])

    assert status == 200 and body["model"] == "v2"  # the canary's share is 100%
    conversation = Conversation.objects.get(channel="openai")
    assert (conversation.rollout, conversation.adapter_version.name) == ("canary", "v2")


def test_a_customer_may_not_name_the_canary_and_does_not_list_it(canary_ready, customer, faq):
    status, body = _complete(customer, "v2", faq[0]["instruction"])
    assert status == 404 and body["error"]["code"] == "model_not_found"
    key = Token.objects.get_or_create(user=customer)[0].key
    listed = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key}").json()["data"]
    assert [model["id"] for model in listed] == ["v1"]


@pytest.mark.parametrize(("model", "answered_by", "side"), [("default", "v2", "canary"), ("v1", "v1", ""), ("v2", "v2", "")])
def test_staff_get_the_split_for_the_alias_and_exactly_the_version_they_name(canary_ready, staff_user, faq, model, answered_by, side):
    status, body = _complete(staff_user, model, faq[0]["instruction"])

    assert status == 200 and body["model"] == answered_by
    conversation = Conversation.objects.get(channel="openai")
    assert (conversation.rollout, conversation.adapter_version.name) == (side, answered_by)


def test_without_a_canary_a_customer_naming_the_active_version_is_pinned_to_it(canary_ready, customer, faq):
    rollout.canary_stop()
    status, body = _complete(customer, "v1", faq[0]["instruction"])

    assert status == 200 and body["model"] == "v1" and body["choices"][0]["message"]["content"] == faq[0]["output"]
    assert Conversation.objects.get(channel="openai").rollout == ""
