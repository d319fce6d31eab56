"""Pages speak Simplified Chinese by default and English on request."""

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_home_page_defaults_to_simplified_chinese(client):
    response = client.get("/")
    assert response.status_code == 200
    assert '<html lang="zh-hans">' in response.content.decode()
    assert "客服" in response.content.decode()


def test_language_switch_sets_english(client):
    response = client.post(reverse("set_language"), {"language": "en", "next": "/"}, follow=True)
    body = response.content.decode()
    assert '<html lang="en">' in body and "New conversation" in body


def test_admin_import_page_is_translated(staff_client):
    body = staff_client.get(reverse("admin:knowledge_qapair_import")).content.decode()
    assert "导入" in body
    staff_client.post(reverse("set_language"), {"language": "en", "next": "/"})
    body = staff_client.get(reverse("admin:knowledge_qapair_import")).content.decode()
    assert "Import Q&amp;A pairs" in body
