"""Lineage from a served answer: answer → the adapter version that answered it (and on from there,
training/tests/test_lineage.py: version → run → snapshot → the rows as trained)."""

import pytest
from django.urls import reverse

from chat.models import Conversation, Message
from training.tests.factories import make_adapter_version

pytestmark = [pytest.mark.django_db, pytest.mark.services]


def test_a_served_answer_links_to_the_version_that_answered_it(superuser, client, tmp_path):
    version = make_adapter_version("v1", path=tmp_path / "adapter")
    conversation = Conversation.objects.create(session_key="s")
    Message.objects.create(conversation=conversation, role="user", text="用户问：如何退货？")
    answer = Message.objects.create(conversation=conversation, role="assistant", text="7天无理由退货。", adapter_version=version, adapter_name="v1")
    client.force_login(superuser)
    page = client.get(reverse("admin:chat_message_change", args=[answer.pk]))
    assert page.status_code == 200
    version_page = reverse("admin:training_adapterversion_change", args=[version.pk])
    assert version_page in page.content.decode()
    assert client.get(version_page).status_code == 200
