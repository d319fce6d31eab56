import pytest
from django.urls import reverse

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


def test_staff_read_conversations_with_their_messages_and_feedback(admin_client):
    conversation = Conversation.objects.create(title="如何退货？")
    Message.objects.create(conversation=conversation, role="user", text="如何退货？")
    Message.objects.create(conversation=conversation, role="assistant", text="7天无理由退货。", rating=-1, feedback_comment="不够详细")
    page = admin_client.get(reverse("admin:chat_conversation_change", args=[conversation.pk])).content.decode()
    assert "7天无理由退货。" in page and "不够详细" in page
    listing = admin_client.get(reverse("admin:chat_message_changelist"), {"rating__exact": "-1"})
    assert [m.text for m in listing.context["cl"].result_list] == ["7天无理由退货。"]


@pytest.mark.django_db(transaction=True)
def test_adapter_versions_page_shows_the_serving_dtype_once_the_engine_is_loaded(admin_client, serving, faq):
    from chat.serving import active_engine

    active_engine().generate(faq[0]["instruction"])
    page = admin_client.get(reverse("admin:training_adapterversion_changelist"), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "serves chats in float32" in page and "new chats: v1" in page
