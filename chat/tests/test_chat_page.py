"""The chat page at / and /chat/ (its behaviour in a browser: test_browser.py)."""

import json
import re

import pytest

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


def _config(response):
    match = re.search(r'<script id="chat-config" type="application/json">(.*?)</script>', response.content.decode(), re.DOTALL)
    return json.loads(match.group(1))


@pytest.mark.parametrize("url", ["/", "/chat/"])
def test_both_addresses_render_the_chat_ui(client, url):
    response = client.get(url)
    assert response.status_code == 200
    body = response.content.decode()
    for part in ('id="chat-log"', 'id="chat-input"', 'id="chat-send"', 'id="chat-stop"', 'id="chat-new"', 'id="chat-status"'):
        assert part in body
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in body
    assert _config(response)["wsPath"] == "/ws/chat/"


def test_the_page_loads_only_local_assets(client):
    body = client.get("/").content.decode()
    assert "http://" not in body and "https://" not in body
    assets = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', body)
    assert "/static/js/chat.js" in assets and "/static/css/chat.css" in assets
    assert all(asset.startswith("/static/") for asset in assets), assets


def test_the_page_speaks_english_when_the_browser_asks_for_it(client):
    body = client.get("/chat/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert '<html lang="en">' in body
    assert "New conversation" in body and "Send" in body and 'data-helpful="Helpful"' in body


def test_the_page_speaks_simplified_chinese_by_default(client):
    assert '<html lang="zh-hans">' in client.get("/").content.decode()


def test_the_page_gives_the_browser_a_session_before_the_websocket_connects(client, settings):
    response = client.get("/")
    assert response.cookies[settings.SESSION_COOKIE_NAME].value
    assert client.session.session_key == response.cookies[settings.SESSION_COOKIE_NAME].value


def test_a_reload_shows_the_history_of_the_sessions_own_conversation(client):
    client.get("/")
    conversation = Conversation.objects.create(session_key=client.session.session_key)
    Message.objects.create(conversation=conversation, role="user", text="如何退货？")
    answer = Message.objects.create(conversation=conversation, role="assistant", text="<b>您好</b>", latency_ms=900, first_token_ms=120, rating=1)
    Message.objects.create(conversation=conversation, role="assistant", text="")  # stopped before its first token

    response = client.get(f"/?conversation={conversation.pk}")

    config = _config(response)
    assert config["conversation"] == str(conversation.pk)
    assert [(m["role"], m["text"]) for m in config["history"]] == [("user", "如何退货？"), ("assistant", "<b>您好</b>")]
    assert config["history"][1] == {
        "id": answer.pk, "role": "assistant", "text": "<b>您好</b>", "latency_ms": 900, "first_token_ms": 120, "rating": 1,
        "finish_reason": "", "handoff_offered": False, "suggestions": [], "cited": [],
    }
    assert "<b>您好</b>" not in response.content.decode()  # json_script escapes markup


def test_a_reload_shows_a_fallback_replys_offers_again(client, settings):
    """What the done frame showed live under a fallback reply (a person, "did you mean") and under
    a grounded answer (its cited source, with CSP_CHAT_SHOW_SOURCES) comes back after a reload."""
    settings.CSP_CHAT_SHOW_SOURCES = True
    settings.CSP_CHAT_SUGGESTIONS = 1
    client.get("/")
    conversation = Conversation.objects.create(session_key=client.session.session_key)
    Message.objects.create(conversation=conversation, role="user", text="退款多久？")
    Message.objects.create(
        conversation=conversation, role="assistant", text="抱歉，我不确定。", mode="fallback",
        sources=[
            {"pair": 7, "rank": 1, "score": 0.93, "question": "退款多久到账？", "suggest": True},
            {"pair": 8, "rank": 2, "score": 0.92, "question": "怎么申请退款？", "suggest": True},
            {"pair": 9, "rank": 3, "score": 0.80, "question": "发票怎么开？", "suggest": False},
        ],
    )
    Message.objects.create(
        conversation=conversation, role="assistant", text="3到5个工作日。", mode="grounded", used=[7],
        sources=[{"pair": 7, "rank": 1, "score": 0.95, "question": "退款多久到账？", "suggest": True}],
    )

    history = _config(client.get(f"/?conversation={conversation.pk}"))["history"]

    fallback, grounded = history[1], history[2]
    assert fallback["handoff_offered"] is True
    assert fallback["suggestions"] == [{"pair": 7, "question": "退款多久到账？"}]  # at most CSP_CHAT_SUGGESTIONS
    assert fallback["cited"] == []
    assert grounded["handoff_offered"] is False and grounded["suggestions"] == []
    assert grounded["cited"] == ["退款多久到账？"]
    assert "sources" not in grounded  # scores and ids stay out of the page


@pytest.mark.parametrize("conversation_id", ["someone-elses", "00000000-0000-0000-0000-000000000000", "not-a-uuid"])
def test_another_sessions_or_an_unknown_conversation_is_not_shown(client, conversation_id):
    stranger = Conversation.objects.create(session_key="another-session")
    Message.objects.create(conversation=stranger, role="user", text="我的地址是……")
    if conversation_id == "someone-elses":
        conversation_id = stranger.pk

    config = _config(client.get(f"/chat/?conversation={conversation_id}"))

    assert config["conversation"] is None and config["history"] == []


def test_staff_see_a_link_to_the_admin_and_customers_do_not(client, customer, staff_user):
    assert 'href="/admin/"' not in client.get("/").content.decode()
    client.force_login(customer)
    assert 'href="/admin/"' not in client.get("/").content.decode()
    client.force_login(staff_user)
    assert 'href="/admin/"' in client.get("/").content.decode()
