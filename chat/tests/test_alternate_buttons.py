"""The "add the customer's question as an alternate of this pair" buttons (issue #13): beside the
suggested curated answers on the handoff reply page, and beside the retrieved pairs of an answer
in the review queue."""

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.urls import reverse

from chat import handoff
from chat.models import Conversation, Message
from knowledge import retrieval
from knowledge.models import QAPair
from knowledge.tests.factories import make_pair

pytestmark = pytest.mark.django_db

APPROVED = QAPair.Status.APPROVED
PARAPHRASE = "快递什么时候能寄出来"
BUTTON = 'class="button add-alternate"'


@pytest.fixture
def shop():
    return {
        "refund": make_pair("用户问：如何退货？", "签收后7天内可无理由退货。", status=APPROVED, alternates=["东西不想要了能退吗"]),
        "shipping": make_pair("用户问：发货需要多久？", "现货24小时内发货。", status=APPROVED, alternates=["几天能发货"]),
    }


def _messages(response):
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


# --- the handoff reply page ---


@pytest.fixture
def waiting():
    conversation = Conversation.objects.create(session_key="s", title="要找人工")
    question = Message.objects.create(conversation=conversation, role="user", text=PARAPHRASE)
    handoff.handoff_request(conversation=conversation)
    return conversation, question


def test_staff_teach_a_suggested_pair_the_customers_question_from_the_handoff_page(staff_client, shop, waiting):
    conversation, question = waiting
    url = reverse("admin:chat_conversation_handoff", args=[conversation.pk])
    page = staff_client.get(url, HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert page.count(BUTTON) == 2  # one beside each suggested pair
    assert f'value="{shop["shipping"].pk}"' in page and f'name="question" value="{question.pk}"' in page

    done = staff_client.post(url, {"alternate": shop["shipping"].pk, "question": question.pk}, follow=True, HTTP_ACCEPT_LANGUAGE="en")

    assert done.status_code == 200 and done.redirect_chain[-1][0] == url
    assert _messages(done)[0][0] == "success" and PARAPHRASE in _messages(done)[0][1]
    shop["shipping"].refresh_from_db()
    assert shop["shipping"].alternates == ["几天能发货", PARAPHRASE]
    assert LogEntry.objects.filter(object_id=str(shop["shipping"].pk)).exists()
    best = retrieval.serving_index().search(PARAPHRASE, k=1)[0]
    assert best.pair_id == shop["shipping"].pk and best.score == pytest.approx(1.0, abs=1e-3)

    again = staff_client.post(url, {"alternate": shop["shipping"].pk, "question": question.pk}, follow=True, HTTP_ACCEPT_LANGUAGE="en")
    link = f'<a href="{reverse("admin:knowledge_qapair_change", args=[shop["shipping"].pk])}">#{shop["shipping"].pk}</a>'
    assert _messages(again) == [("info", f"Pair {link} already asks “{PARAPHRASE}”; nothing changed.")]


def test_the_handoff_page_says_why_a_question_was_not_added(staff_client, shop, waiting):
    conversation, question = waiting
    url = reverse("admin:chat_conversation_handoff", args=[conversation.pk])
    staff_client.post(url, {"alternate": shop["shipping"].pk, "question": question.pk}, follow=True)  # its message read

    taken = staff_client.post(url, {"alternate": shop["refund"].pk, "question": question.pk}, follow=True, HTTP_ACCEPT_LANGUAGE="en")
    unknown = staff_client.post(url, {"alternate": "999999", "question": question.pk}, follow=True, HTTP_ACCEPT_LANGUAGE="en")
    bogus = staff_client.post(url, {"alternate": "x", "question": "²"}, follow=True, HTTP_ACCEPT_LANGUAGE="en")
    huge = staff_client.post(url, {"alternate": "9" * 30, "question": "9" * 30}, follow=True, HTTP_ACCEPT_LANGUAGE="en")

    assert _messages(taken) == [
        ("error", f"Nothing was added to pair #{shop['refund'].pk}: “{PARAPHRASE}” is already an alternate question of pair #{shop['shipping'].pk}.")
    ]
    assert all(r.status_code == 200 and _messages(r)[0][0] == "error" for r in (unknown, bogus, huge))
    shop["refund"].refresh_from_db()
    assert shop["refund"].alternates == ["东西不想要了能退吗"]


def test_staff_who_cannot_change_pairs_get_no_button_on_the_handoff_page(staff_client, staff_user, shop, waiting):
    conversation, question = waiting
    staff_user.user_permissions.remove(Permission.objects.get(codename="change_qapair"))
    url = reverse("admin:chat_conversation_handoff", args=[conversation.pk])

    page = staff_client.get(url, HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "insert-suggestion" in page and BUTTON not in page
    assert staff_client.post(url, {"alternate": shop["shipping"].pk, "question": question.pk}).status_code == 403
    shop["shipping"].refresh_from_db()
    assert shop["shipping"].alternates == ["几天能发货"]


# --- the review page of an answer rated 👎 ---


@pytest.fixture
def disliked(shop):
    conversation = Conversation.objects.create(session_key="s")
    Message.objects.create(conversation=conversation, role="user", text=PARAPHRASE)
    sources = [
        {"pair": shop["shipping"].pk, "rank": 1, "score": 0.87, "question": "用户问：发货需要多久？"},
        {"pair": shop["refund"].pk, "rank": 2, "score": 0.71, "question": "用户问：如何退货？"},
        {"pair": 999999, "rank": 3, "score": 0.5, "question": "a deleted pair"},
    ]
    return Message.objects.create(
        conversation=conversation, role="assistant", text="您好，请联系客服。", mode="fallback", sources=sources, rating=-1
    )


def test_staff_teach_a_retrieved_pair_the_customers_question_from_the_review_page(staff_client, shop, disliked):
    url = reverse("admin:chat_reviewitem_change", args=[disliked.pk])
    page = staff_client.get(url, HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert page.count(BUTTON) == 2  # the deleted pair is not listed
    assert f'name="alternate" value="{shop["shipping"].pk}"' in page

    done = staff_client.post(url, {"alternate": shop["shipping"].pk}, follow=True, HTTP_ACCEPT_LANGUAGE="en")

    assert done.redirect_chain[-1][0] == url and _messages(done)[0][0] == "success"
    shop["shipping"].refresh_from_db()
    assert shop["shipping"].alternates == ["几天能发货", PARAPHRASE]

    taken = staff_client.post(url, {"alternate": shop["refund"].pk}, follow=True, HTTP_ACCEPT_LANGUAGE="en")
    assert _messages(taken)[0][0] == "error" and f"alternate question of pair #{shop['shipping'].pk}" in _messages(taken)[0][1]
    shop["refund"].refresh_from_db()
    assert shop["refund"].alternates == ["东西不想要了能退吗"]


def test_staff_who_cannot_change_pairs_get_no_button_on_the_review_page(staff_client, staff_user, shop, disliked):
    staff_user.user_permissions.remove(Permission.objects.get(codename="change_qapair"))
    url = reverse("admin:chat_reviewitem_change", args=[disliked.pk])

    page = staff_client.get(url, HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert 'id="retrieved-pairs"' in page and BUTTON not in page
    assert staff_client.post(url, {"alternate": shop["shipping"].pk}).status_code == 403
    shop["shipping"].refresh_from_db()
    assert shop["shipping"].alternates == ["几天能发货"]
