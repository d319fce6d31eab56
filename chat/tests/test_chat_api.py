"""REST chat (/api/v1/chat/) with the tiny model and a trained adapter active as v1."""

import threading

import pytest

from chat.engine import Token
from chat.models import Conversation, Message
from chat.serving import active_engine, reset_engine

pytestmark = pytest.mark.django_db


def _ask(api, text, conversation=None, **options):
    return api.post("/api/v1/chat/", {"message": text, "conversation": conversation, **options}, format="json")


def test_a_question_gets_the_trained_answer_and_is_stored(serving, faq, customer_api, customer):
    response = _ask(customer_api, faq[0]["instruction"])

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["answer"] == faq[0]["output"] and body["adapter"] == "v1" and body["finish_reason"] == "stop"
    assert body["tokens"] > 0 and body["latency_ms"] >= body["first_token_ms"] > 0
    conversation = Conversation.objects.get(pk=body["conversation"])
    assert conversation.channel == "api" and conversation.user == customer
    answer = Message.objects.get(pk=body["message"])
    assert answer.text == faq[0]["output"] and answer.adapter_version == serving and answer.tokens == body["tokens"]


def test_the_conversation_id_continues_the_conversation(serving, faq, customer_api):
    first = _ask(customer_api, faq[0]["instruction"]).json()
    second = _ask(customer_api, faq[1]["instruction"], first["conversation"]).json()

    # (The tiny adapter memorised single questions: a second turn, with the first as its
    # history, gets some other text, so only where it is stored is checked.)
    assert second["conversation"] == first["conversation"]
    shown = customer_api.get(f"/api/v1/chat/conversations/{first['conversation']}/").json()
    assert [(m["role"], m["text"]) for m in shown["messages"]] == [
        ("user", faq[0]["instruction"]), ("assistant", faq[0]["output"]),
        ("user", faq[1]["instruction"]), ("assistant", second["answer"]),
    ]
    assert shown["message_count"] == 4 and shown["messages"][1]["adapter"] == "v1"


def test_conversations_are_listed_for_their_owner_only(serving, faq, customer_api, staff_api):
    mine = _ask(customer_api, faq[0]["instruction"]).json()["conversation"]
    theirs = _ask(staff_api, faq[1]["instruction"]).json()["conversation"]

    listed = customer_api.get("/api/v1/chat/conversations/").json()
    assert [c["id"] for c in listed["results"]] == [mine]
    assert listed["results"][0]["title"] == faq[0]["instruction"]
    assert customer_api.get(f"/api/v1/chat/conversations/{theirs}/").status_code == 404
    assert customer_api.get("/api/v1/chat/conversations/not-a-uuid/").status_code == 404


def test_another_users_conversation_cannot_be_continued(serving, faq, customer_api, staff_api):
    theirs = _ask(staff_api, faq[0]["instruction"]).json()["conversation"]

    response = _ask(customer_api, "我的订单呢？", theirs)

    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert not Message.objects.filter(text="我的订单呢？").exists()


def test_feedback_is_stored_on_an_own_answer_only(serving, faq, customer_api, staff_api):
    answer_id = _ask(customer_api, faq[0]["instruction"]).json()["message"]
    url = f"/api/v1/chat/messages/{answer_id}/feedback/"

    response = customer_api.post(url, {"rating": -1, "comment": " 不对 "}, format="json")

    assert response.status_code == 200 and response.json() == {"message": answer_id, "rating": -1, "comment": "不对"}
    answer = Message.objects.get(pk=answer_id)
    assert answer.rating == -1 and answer.feedback_comment == "不对"
    assert staff_api.post(url, {"rating": 1}, format="json").status_code == 404
    question_id = answer_id - 1
    assert customer_api.post(f"/api/v1/chat/messages/{question_id}/feedback/", {"rating": 1}, format="json").status_code == 404
    assert customer_api.post(url, {"rating": "1"}, format="json").status_code == 400
    assert customer_api.post(url, {"rating": 2}, format="json").status_code == 400
    assert Message.objects.get(pk=answer_id).rating == -1


def test_anonymous_callers_are_refused(anon_api, db):
    assert _ask(anon_api, "如何退货？").status_code == 401
    assert anon_api.get("/api/v1/chat/conversations/").status_code == 401
    assert not Conversation.objects.exists()


@pytest.mark.parametrize(
    "body, field",
    [({"message": 5}, "message"), ({"message": "  "}, "message"), ({"message": "hi", "conversation": 5}, "conversation"),
     ({"message": "hi", "max_new_tokens": 0}, "max_new_tokens"), ({"message": "hi", "temperature": "0.5"}, "temperature")],
)
def test_invalid_fields_are_refused_with_their_name(customer_api, body, field):
    response = customer_api.post("/api/v1/chat/", body, format="json")

    assert response.status_code == 400 and field in response.json()


def test_a_message_over_the_character_cap_is_refused_before_the_engine(customer_api, settings):
    settings.CSP_CHAT_MAX_MESSAGE_CHARS = 10

    response = _ask(customer_api, "如何退货？" * 3)

    assert response.status_code == 400 and "10" in response.json()["message"][0]
    assert not Conversation.objects.exists()


def test_a_message_over_the_token_budget_is_refused_and_nothing_is_stored(serving, customer_api, settings):
    # Rare characters are several byte-level tokens each: 2000 of them cannot fit 1024 tokens.
    response = _ask(customer_api, "龘" * settings.CSP_CHAT_MAX_MESSAGE_CHARS)

    assert response.status_code == 400 and "tokens" in response.json()["message"][0]
    assert not Conversation.objects.exists()


def test_max_new_tokens_cuts_the_answer(serving, faq, customer_api):
    body = _ask(customer_api, faq[0]["instruction"], max_new_tokens=2).json()

    assert body["finish_reason"] == "length" and body["tokens"] == 2 and faq[0]["output"].startswith(body["answer"])


def test_a_temperature_near_zero_answers_greedily(serving, faq, customer_api):
    # 1e-185 is a valid JSON number; dividing logits by it gives inf and NaN probabilities.
    body = _ask(customer_api, faq[0]["instruction"], temperature=1e-185).json()

    assert body["answer"] == faq[0]["output"] and body["finish_reason"] == "stop"


@pytest.fixture
def one_slot(settings, serving):
    """An engine that runs one answer and queues none (its limits are fixed when it is created)."""
    reset_engine()
    settings.CSP_CHAT_MAX_ACTIVE, settings.CSP_CHAT_MAX_WAITING = 1, 0
    yield
    reset_engine()  # later tests get an engine with the default limits


def test_a_busy_engine_answers_429_with_retry_after_and_stores_nothing(one_slot, faq, customer_api):
    release = threading.Event()
    # The decode thread waits in this callback, so the held request keeps the only slot.
    held = active_engine().submit(faq[0]["instruction"], on_event=lambda event: isinstance(event, Token) and release.wait(30))
    try:
        response = _ask(customer_api, faq[1]["instruction"])
    finally:
        release.set()
        held.result(30)

    assert response.status_code == 429 and response.json()["code"] == "busy"
    assert int(response["Retry-After"]) >= 1
    assert not Conversation.objects.exists()


def test_a_missing_base_model_answers_503_not_500(customer_api, settings, tmp_path):
    reset_engine()
    settings.CSP_BASE_MODEL = tmp_path / "nowhere"
    try:
        response = _ask(customer_api, "如何退货？")
    finally:
        reset_engine()

    assert response.status_code == 503 and response.json()["code"] == "unavailable"
