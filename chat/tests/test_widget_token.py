"""The widget token's lifetime (chat/widget.py, docs/widget.md): it holds for CSP_WIDGET_TOKEN_DAYS,
each visit renews it for the same widget key, and an expired one is refused on the socket and
replaced on the page by a new identity."""

import asyncio
import json
import re
import subprocess
import sys
import time
from urllib.parse import quote

import pytest
from django.core import signing
from django.test import Client

from chat import widget
from chat.models import Conversation, Message

DAY = 86400
ORIGIN = [(b"origin", b"http://localhost")]


def _config(response):
    match = re.search(r'<script id="chat-config" type="application/json">(.*?)</script>', response.content.decode(), re.DOTALL)
    return json.loads(match.group(1))


def _signed_ago(key, seconds):
    """A token for `key` as widget_token signed it `seconds` ago."""
    signed_at = time.time() - seconds
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: signed_at)
        return widget.widget_token(key)


def _key():
    return widget.widget_key(widget.new_widget_token())


def _socket_connects(token):
    from channels.testing import WebsocketCommunicator

    from csplatform.asgi import application

    async def connect():
        communicator = WebsocketCommunicator(application, "/ws/chat/?lang=en&token=" + quote(token), headers=ORIGIN)
        connected, _ = await communicator.connect()
        if connected:
            await communicator.disconnect()
        return connected

    return asyncio.run(connect())


def test_a_fresh_token_stands_for_its_widget_key():
    key = _key()
    assert key.startswith(widget.KEY_PREFIX)
    assert widget.widget_key(widget.widget_token(key)) == key


def test_a_token_holds_for_the_days_set_and_not_a_minute_more(settings):
    settings.CSP_WIDGET_TOKEN_DAYS = 2
    key = _key()
    assert widget.widget_key(_signed_ago(key, 2 * DAY - 60)) == key
    assert widget.widget_key(_signed_ago(key, 2 * DAY + 60)) is None
    settings.CSP_WIDGET_TOKEN_DAYS = 3  # read at each check: the same token holds again
    assert widget.widget_key(_signed_ago(key, 2 * DAY + 60)) == key


@pytest.mark.django_db(transaction=True)
def test_the_socket_takes_a_fresh_token_and_refuses_an_expired_one_as_a_forged_one(settings):
    key = _key()
    fresh, expired = widget.widget_token(key), _signed_ago(key, settings.CSP_WIDGET_TOKEN_DAYS * DAY + 60)
    forged = fresh[:-2] + ("AA" if not fresh.endswith("AA") else "BB")
    assert [_socket_connects(token) for token in (fresh, expired, forged)] == [True, False, False]


@pytest.mark.django_db
def test_a_token_that_still_holds_is_renewed_on_the_page_for_the_same_key_and_its_conversation():
    key = _key()
    mine = Conversation.objects.create(session_key=key)
    Message.objects.create(conversation=mine, role="user", text="如何退货？")
    old = _signed_ago(key, 29 * DAY)

    config = _config(Client().get("/widget/", {"token": old, "conversation": mine.pk}))
    assert config["conversation"] == str(mine.pk) and config["history"][0]["text"] == "如何退货？"
    renewed = config["widgetToken"]
    assert renewed != old and widget.widget_key(renewed) == key
    # signed now: it holds for a whole limit again, where the old one had a day left
    assert signing.loads(renewed, salt=widget.TOKEN_SALT, max_age=60) == key


@pytest.mark.django_db
@pytest.mark.parametrize(
    "stale",
    [
        lambda key, days: _signed_ago(key, days * DAY + 60),  # expired
        lambda key, days: signing.Signer(salt=widget.TOKEN_SALT).sign_object(key),  # signed with no timestamp
    ],
    ids=["expired", "no-timestamp"],
)
def test_a_stale_token_on_the_page_gets_a_new_identity_and_an_empty_conversation(settings, stale):
    key = _key()
    mine = Conversation.objects.create(session_key=key)
    Message.objects.create(conversation=mine, role="user", text="如何退货？")
    token = stale(key, settings.CSP_WIDGET_TOKEN_DAYS)

    response = Client().get("/widget/", {"token": token, "conversation": mine.pk})
    assert response.status_code == 200
    config = _config(response)
    assert config["history"] == [] and config["conversation"] is None
    new_key = widget.widget_key(config["widgetToken"])
    assert new_key is not None and new_key != key
    assert widget.widget_key(token) is None


@pytest.mark.django_db(transaction=True)
def test_the_socket_refuses_a_token_signed_without_a_timestamp():
    assert _socket_connects(signing.Signer(salt=widget.TOKEN_SALT).sign_object(_key())) is False


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "CSP_WIDGET_TOKEN_DAYS='soon' is not a whole number"),
        ("1.5", "CSP_WIDGET_TOKEN_DAYS='1.5' is not a whole number"),
        ("", "CSP_WIDGET_TOKEN_DAYS='' is not a whole number"),
        ("0", "CSP_WIDGET_TOKEN_DAYS=0 must be at least 1"),
        ("-30", "CSP_WIDGET_TOKEN_DAYS=-30 must be at least 1"),
    ],
)
def test_a_bad_token_lifetime_stops_start_up_naming_the_variable(value, message):
    result = subprocess.run(
        [sys.executable, "-c", "import csplatform.settings"],
        env={"PATH": "/usr/bin:/bin", "CSP_WIDGET_TOKEN_DAYS": value}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_token_lifetime_is_thirty_days_unless_set():
    read = "import csplatform.settings as s; print(s.CSP_WIDGET_TOKEN_DAYS)"
    for env, days in (({}, "30"), ({"CSP_WIDGET_TOKEN_DAYS": "7"}, "7")):
        result = subprocess.run(
            [sys.executable, "-c", read], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
        )
        assert result.stdout.strip() == days, result.stderr
