"""The review queue: answers rated 👎 (or flagged) become draft pairs that the next snapshot trains on."""

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.urls import reverse

from chat import review
from chat import services as chat_services
from chat.models import Conversation, Message, ReviewItem
from knowledge import services
from knowledge.models import QAPair
from knowledge.tests.factories import make_category, make_pair
from training.snapshots import snapshot_create

pytestmark = [pytest.mark.django_db, pytest.mark.services]

QUESTION = "用户问：运费险怎么理赔？"
BAD_ANSWER = "您好，请联系客服。"
GOOD_ANSWER = "签收后7天内在订单页申请退货，运费险自动理赔，退款3个工作日内到账。"


def _exchange(question=QUESTION, answer=BAD_ANSWER, *, rating=None, session_key="s1", channel=Conversation.Channel.WEB):
    """A conversation with one earlier exchange, then `question` and its `answer` (the one reviewed)."""
    conversation = Conversation.objects.create(session_key=session_key, channel=channel)
    Message.objects.create(conversation=conversation, role=Message.Role.USER, text="你好")
    Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, text="您好，有什么可以帮您？")
    Message.objects.create(conversation=conversation, role=Message.Role.USER, text=question)
    reply = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, text=answer, adapter_name="v1")
    if rating is not None:
        chat_services.message_rate(message_id=reply.pk, rating=rating, session_key=session_key)
        reply.refresh_from_db()
    return reply


def test_the_queue_holds_disliked_and_flagged_answers_only():
    disliked = _exchange(rating=-1)
    liked = _exchange("用户问：几天发货？", "48小时内发货。", rating=1)
    unrated = _exchange("用户问：包邮吗？", "满99包邮。")
    customer_question = Message.objects.get(conversation=disliked.conversation, text=QUESTION)
    assert list(ReviewItem.objects.all()) == [disliked]
    review.review_flag(answers=Message.objects.filter(pk__in=[unrated.pk, customer_question.pk]))
    assert set(ReviewItem.objects.all()) == {disliked, unrated}  # a customer's message is never flagged
    assert liked.question().text == "用户问：几天发货？"


def test_dislike_to_draft_to_approved_pair_reaches_the_next_snapshot(staff_api, staff_user):
    answer = _exchange(rating=-1)
    listed = staff_api.get("/api/v1/review-queue/")
    assert listed.status_code == 200
    [item] = listed.json()["results"]
    assert (item["id"], item["question"], item["answer"], item["rating"], item["adapter"]) == (answer.pk, QUESTION, BAD_ANSWER, -1, "v1")

    response = staff_api.post(f"/api/v1/review-queue/{answer.pk}/draft/", {"output": GOOD_ANSWER}, format="json")
    assert response.status_code == 201, response.content
    pair = QAPair.objects.get(pk=response.json()["id"])
    assert (pair.instruction, pair.output, pair.status, pair.source) == (QUESTION, GOOD_ANSWER, "draft", "feedback")
    assert list(pair.drafted_from.all()) == [answer] and pair.created_by == staff_user
    answer.refresh_from_db()
    assert answer.review_status == "drafted" and answer.reviewed_by == staff_user
    assert staff_api.get("/api/v1/review-queue/").json()["results"] == []  # it left the queue
    assert staff_api.get("/api/v1/review-queue/?review=drafted").json()["results"][0]["draft_pairs"] == [pair.pk]
    assert LogEntry.objects.filter(object_id=str(pair.pk), change_message__contains=f"#{answer.pk}").exists()

    assert pair.pk not in snapshot_create().manifest["train_pair_ids"] + snapshot_create().manifest["dev_pair_ids"]
    services.qa_set_status(pairs=QAPair.objects.filter(pk=pair.pk), status=QAPair.Status.APPROVED, user=staff_user)
    manifest = snapshot_create().manifest
    assert pair.pk in manifest["train_pair_ids"] + manifest["dev_pair_ids"]


def test_a_draft_for_a_question_already_stored_is_refused_naming_the_pair(staff_api):
    existing = make_pair(instruction=QUESTION)
    answer = _exchange(rating=-1)
    response = staff_api.post(f"/api/v1/review-queue/{answer.pk}/draft/", {"output": GOOD_ANSWER}, format="json")
    assert response.status_code == 400
    assert f"#{existing.pk}" in response.json()["instruction"][0]
    answer.refresh_from_db()
    assert answer.review_status == "" and QAPair.objects.count() == 1  # nothing stored, still waiting

    blank = staff_api.post(f"/api/v1/review-queue/{answer.pk}/draft/", {"output": "  ", "instruction": "用户问：新问题？"}, format="json")
    assert blank.status_code == 400 and list(blank.json()) == ["output"]
    unknown = staff_api.post(f"/api/v1/review-queue/{answer.pk}/draft/", {"output": GOOD_ANSWER, "category": "无此分类"}, format="json")
    assert unknown.status_code == 400 and "无此分类" in unknown.json()["category"][0]


def test_dismissing_takes_an_answer_out_of_the_queue(staff_api):
    answer = _exchange(rating=-1)
    response = staff_api.post(f"/api/v1/review-queue/{answer.pk}/dismiss/")
    assert response.status_code == 200 and response.json()["review_status"] == "dismissed"
    assert staff_api.get("/api/v1/review-queue/").json()["results"] == []
    assert staff_api.get("/api/v1/review-queue/?review=nonsense").status_code == 400


def test_customers_and_staff_without_permission_cannot_review(customer_api, staff_api, staff_user):
    answer = _exchange(rating=-1)
    assert customer_api.get("/api/v1/review-queue/").status_code == 403
    assert customer_api.post(f"/api/v1/review-queue/{answer.pk}/draft/", {"output": GOOD_ANSWER}, format="json").status_code == 403
    staff_user.user_permissions.remove(Permission.objects.get(codename="add_qapair"))
    refused = staff_api.post(f"/api/v1/review-queue/{answer.pk}/draft/", {"output": GOOD_ANSWER}, format="json")
    assert refused.status_code == 403 and not QAPair.objects.exists()


def test_admin_review_page_shows_the_conversation_and_drafts_a_corrected_pair(staff_client):
    category = make_category("退换货")
    answer = _exchange(rating=-1)
    _exchange("用户问：几天发货？", "48小时内发货。", rating=1)
    changelist = staff_client.get(reverse("admin:chat_reviewitem_changelist"))
    assert changelist.status_code == 200
    assert list(changelist.context["cl"].result_list) == [answer]  # waiting ones only, by default

    url = reverse("admin:chat_reviewitem_change", args=[answer.pk])
    page = staff_client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "您好，有什么可以帮您？" in html and 'id="under-review"' in html  # the conversation around it
    assert page.context["form"].initial == {"instruction": QUESTION, "output": BAD_ANSWER}

    posted = staff_client.post(url, {"instruction": QUESTION, "input": "", "output": GOOD_ANSWER, "category": category.pk, "draft": "1"})
    assert posted.status_code == 302
    pair = QAPair.objects.get(drafted_from=answer)
    assert (pair.output, pair.category, pair.status) == (GOOD_ANSWER, category, "draft")
    assert list(staff_client.get(reverse("admin:chat_reviewitem_changelist")).context["cl"].result_list) == []


def test_admin_review_page_keeps_the_reviewers_text_when_the_pair_is_refused(staff_client):
    existing = make_pair(instruction=QUESTION)
    answer = _exchange(rating=-1)
    url = reverse("admin:chat_reviewitem_change", args=[answer.pk])
    page = staff_client.post(url, {"instruction": QUESTION, "output": GOOD_ANSWER, "draft": "1"})
    assert page.status_code == 200
    assert f"#{existing.pk}" in page.context["form"].errors["instruction"][0]  # names the stored pair
    assert page.context["form"]["output"].value() == GOOD_ANSWER  # nothing the reviewer typed is lost

    dismissed = staff_client.post(url, {"dismiss": "1"})
    assert dismissed.status_code == 302
    answer.refresh_from_db()
    assert answer.review_status == "dismissed" and QAPair.objects.count() == 1


def test_a_pair_page_links_to_the_answer_it_was_drafted_from_and_the_pair_outlives_the_answer(staff_client, staff_user):
    answer = _exchange(rating=-1)
    pair = review.review_draft_pair(answer=answer, output=GOOD_ANSWER, user=staff_user)
    pair_page = reverse("admin:knowledge_qapair_change", args=[pair.pk])
    answer_page = reverse("admin:chat_reviewitem_change", args=[answer.pk])
    assert answer_page in staff_client.get(pair_page).content.decode()

    answer.conversation.delete()
    assert QAPair.objects.filter(pk=pair.pk).exists()  # the pair stays, only the link goes
    page = staff_client.get(pair_page)
    assert page.status_code == 200 and answer_page not in page.content.decode()
