import datetime

import pytest
from django.urls import reverse
from django.utils import timezone

from chat.models import Conversation, Message
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, TrainingRun

pytestmark = [pytest.mark.django_db, pytest.mark.services]


def test_staff_read_conversations_with_their_messages_and_feedback(admin_client):
    conversation = Conversation.objects.create(title="如何退货？")
    Message.objects.create(conversation=conversation, role="user", text="如何退货？")
    Message.objects.create(conversation=conversation, role="assistant", text="7天无理由退货。", rating=-1, feedback_comment="不够详细")
    page = admin_client.get(reverse("admin:chat_conversation_change", args=[conversation.pk])).content.decode()
    assert "7天无理由退货。" in page and "不够详细" in page
    listing = admin_client.get(reverse("admin:chat_message_changelist"), {"rating": "-1"})
    assert [m.text for m in listing.context["cl"].result_list] == ["7天无理由退货。"]


@pytest.fixture
def history():
    """Four conversations, answered by v1, v2 and the base model, rated and not, one of them old."""
    base = BaseModel.objects.create(name="tiny", path="/models/tiny")
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path="/x", train_count=6, dev_count=0)
    versions = {}
    for name in ("v1", "v2"):
        run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
        versions[name] = AdapterVersion.objects.create(name=name, run=run, base_model=base, path=f"/adapters/{name}")

    def conversation(title, channel, *answers):
        made = Conversation.objects.create(title=title, channel=channel)
        for version, rating, latency in answers:
            Message.objects.create(conversation=made, role="user", text=f"{title}?")
            Message.objects.create(
                conversation=made, role="assistant", text=f"{title}: {version or 'base'}", rating=rating, latency_ms=latency,
                adapter_version=versions.get(version), adapter_name=version or "",
            )
        return made

    made = {
        "liked": conversation("liked", "web", ("v1", 1, 100)),
        "mixed": conversation("mixed", "api", ("v2", -1, 300), ("v1", None, 500)),
        "base": conversation("base", "openai", (None, None, 50)),
        "unanswered": conversation("unanswered", "web"),
    }
    Message.objects.create(conversation=made["unanswered"], role="user", text="unanswered?")
    Conversation.objects.filter(pk=made["unanswered"].pk).update(created_at=timezone.now() - datetime.timedelta(days=40))
    return made


def _conversations(client, **query):
    response = client.get(reverse("admin:chat_conversation_changelist"), query)
    assert response.status_code == 200, query
    return response.context["cl"]


def _titles(client, **query):
    return sorted(c.title for c in _conversations(client, **query).result_list)


def _messages(client, **query):
    response = client.get(reverse("admin:chat_message_changelist"), query)
    assert response.status_code == 200, query
    return sorted(m.text for m in response.context["cl"].result_list)


def test_conversations_are_filtered_by_the_versions_that_answered_them(admin_client, history):
    assert _titles(admin_client, version="v1") == ["liked", "mixed"]
    assert _titles(admin_client, version="v2") == ["mixed"]
    assert _titles(admin_client, version="base") == ["base"]


def test_conversations_are_filtered_by_the_ratings_of_their_answers(admin_client, history):
    assert _titles(admin_client, rating="1") == ["liked"]
    assert _titles(admin_client, rating="-1") == ["mixed"]
    # Answered, and none of the answers rated (a conversation without answers has nothing to rate).
    assert _titles(admin_client, rating="none") == ["base"]


def test_conversations_are_filtered_by_channel_and_date(admin_client, history):
    assert _titles(admin_client, channel__exact="api") == ["mixed"]
    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)  # as the "past 7 days" link has it
    recent = {"created_at__gte": str(today - datetime.timedelta(days=7)), "created_at__lt": str(today + datetime.timedelta(days=1))}
    assert _titles(admin_client, **recent) == ["base", "liked", "mixed"]
    old = timezone.localtime(Conversation.objects.get(title="unanswered").created_at)  # the date hierarchy's
    assert _titles(admin_client, created_at__year=str(old.year), created_at__month=str(old.month), created_at__day=str(old.day)) == [
        "unanswered"
    ]


def test_the_conversation_list_shows_each_ones_answers_versions_and_latency(admin_client, history):
    # Filtered by v1: the counts beside "mixed" are still of all its answers, not of the matches.
    changelist = _conversations(admin_client, version="v1")
    admin = changelist.model_admin
    mixed = next(c for c in changelist.result_list if c.title == "mixed")

    assert admin.message_count(mixed) == 4 and admin.answer_count(mixed) == 2
    assert admin.versions(mixed) == "v2, v1"
    assert admin.mean_latency(mixed) == 400 and admin.last_latency(mixed) == 500
    assert admin.ratings(mixed) == "0 / 1"
    page = admin_client.get(reverse("admin:chat_conversation_changelist")).content.decode()
    assert "v2, v1" in page and "400" in page


def test_messages_are_filtered_by_version_rating_role_and_channel(admin_client, history):
    assert _messages(admin_client, version="v1") == ["liked: v1", "mixed: v1"]
    assert _messages(admin_client, version="base") == ["base: base"]
    # Unrated means an answer without a rating: customers' messages are never rated.
    assert _messages(admin_client, rating="none") == ["base: base", "mixed: v1"]
    assert _messages(admin_client, rating="1") == ["liked: v1"]
    assert _messages(admin_client, role__exact="user", conversation__channel__exact="openai") == ["base?"]
    assert _messages(admin_client, conversation__channel__exact="api", rating="-1") == ["mixed: v2"]


def test_the_message_list_shows_the_version_and_latencies(admin_client, history):
    page = admin_client.get(reverse("admin:chat_message_changelist"), {"version": "v2"}).content.decode()

    assert "mixed: v2" in page and ">v2<" in page and ">300<" in page


def test_the_lists_stay_read_only(admin_client, history):
    answer = Message.objects.filter(role="assistant").first()

    response = admin_client.post(reverse("admin:chat_message_change", args=[answer.pk]), {"text": "changed"})

    assert response.status_code == 403 and Message.objects.get(pk=answer.pk).text == answer.text
    assert admin_client.get(reverse("admin:chat_conversation_add")).status_code == 403


@pytest.mark.django_db(transaction=True)
def test_adapter_versions_page_shows_the_serving_dtype_once_the_engine_is_loaded(admin_client, serving, faq):
    from chat.serving import active_engine

    active_engine().generate(faq[0]["instruction"])
    page = admin_client.get(reverse("admin:training_adapterversion_changelist"), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "serves chats in float32" in page and "new chats: v1" in page
