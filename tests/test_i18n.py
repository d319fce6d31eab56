"""Pages speak Simplified Chinese by default and English on request."""

import asyncio

import pytest
from django.conf import settings
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


# API error texts speak the request's language (LocaleMiddleware: the language cookie, then
# Accept-Language), never the server's default (zh-hans) nor the language a module was imported in.


@pytest.mark.parametrize(("language", "detail"), [("en", "There is no previously active version."), ("zh-hans", "没有上一个激活的版本。")])
def test_rest_api_errors_are_in_the_requests_language(staff_api, language, detail):
    response = staff_api.post("/api/v1/adapter-versions/rollback/", HTTP_ACCEPT_LANGUAGE=language)
    assert response.status_code == 409 and response.json() == {"detail": detail}


def test_analytics_api_and_page_speak_the_requests_language(staff_api, staff_client):
    english = staff_api.get("/api/v1/analytics/?since=soon", HTTP_ACCEPT_LANGUAGE="en")
    chinese = staff_api.get("/api/v1/analytics/?since=soon", HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert english.json() == {"since": ["Enter a date as YYYY-MM-DD."]} and chinese.json()["since"] != english.json()["since"]
    from chat.models import Conversation, Message

    Message.objects.create(conversation=Conversation.objects.create(), role="assistant", text="好的", finish_reason="stop", adapter_name="v1")
    # Each language twice in turn: a label translated once (at import) reads the same in both.
    for language, label in (("en", "handoff rate"), ("zh-hans", "转人工率"), ("en", "handoff rate"), ("zh-hans", "转人工率")):
        staff_client.cookies[settings.LANGUAGE_COOKIE_NAME] = language
        page = staff_client.get(reverse("admin-analytics")).content.decode()
        start = page.index('<table id="analytics-versions">')
        versions = page[start : page.index("</table>", start)]
        assert f"<tr><th>{label}</th>" in versions


@pytest.mark.parametrize(("headers", "english"), [
    ([(b"accept-language", b"en")], True),
    ([], False),  # the server's default
    ([(b"accept-language", b"en"), (b"cookie", f"{settings.LANGUAGE_COOKIE_NAME}=zh-hans".encode())], False),
])
def test_websocket_errors_are_in_the_pages_language(headers, english):
    from channels.testing import WebsocketCommunicator

    from csplatform.asgi import application

    async def refused_frame():
        communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost"), *headers])
        connected, _ = await communicator.connect()
        assert connected
        await communicator.send_json_to({"type": "shout"})
        frame = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return frame

    frame = asyncio.run(refused_frame())
    assert frame["type"] == "error" and frame["code"] == "invalid"
    assert frame["detail"].startswith("Unknown frame type") is english and ("未知" in frame["detail"]) is not english
