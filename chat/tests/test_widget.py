"""The embeddable chat widget (docs/widget.md): CSP_WIDGET_ORIGINS, the /widget/ page's headers and
options, and static/csp/widget.js on a page of another origin in headless Chromium against a real
daphne (the Chromium tests need chromium and chromium-driver; skipped without them)."""

import asyncio
import contextlib
import functools
import http.server
import json
import re
import subprocess
import sys
import threading
import urllib.request
from urllib.parse import quote

import pytest
from django.core import signing
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from chat import widget
from chat.consumers import scope_language
from chat.models import Conversation, Message
from chat.tests.test_browser import WATCH_ANSWERS, _script, _wait, browser  # noqa: F401 (browser: a fixture)
from csplatform.settings import envorigins
from tests.support.livetest import live_daphne

SHOP = "https://shop.example.com"


def _config(response):
    match = re.search(r'<script id="chat-config" type="application/json">(.*?)</script>', response.content.decode(), re.DOTALL)
    return json.loads(match.group(1))


# --- CSP_WIDGET_ORIGINS ---


def test_widget_origins_are_read_lower_cased_with_their_ports(monkeypatch):
    monkeypatch.setenv("CSP_WIDGET_ORIGINS", " https://Shop.Example.com, http://127.0.0.1:8080,http://[::1]:9000 ,")
    assert envorigins("CSP_WIDGET_ORIGINS", "") == ["https://shop.example.com", "http://127.0.0.1:8080", "http://[::1]:9000"]
    monkeypatch.delenv("CSP_WIDGET_ORIGINS")
    assert envorigins("CSP_WIDGET_ORIGINS", "") == []


@pytest.mark.parametrize(
    "value",
    [
        "https://shop.example.com/",  # a path, even "/"
        "https://shop.example.com/help",
        "shop.example.com",  # no scheme
        "ftp://shop.example.com",
        "https://*.example.com",  # no wildcards
        "*",
        "https://shop.example.com:99999",
        "https://user@shop.example.com",
        "https://shop.example.com?x=1",
        "https://shop.example.com; script-src *",  # would write another directive into the header
        "'self'",
    ],
)
def test_a_widget_origin_that_is_not_scheme_host_and_port_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("CSP_WIDGET_ORIGINS", f"https://good.example.com,{value}")
    with pytest.raises(ImproperlyConfigured, match=r"CSP_WIDGET_ORIGINS entry .* is not an origin"):
        envorigins("CSP_WIDGET_ORIGINS", "")


def test_a_bad_widget_origin_stops_start_up():
    result = subprocess.run(
        [sys.executable, "-c", "import csplatform.settings"],
        env={"PATH": "/usr/bin:/bin", "CSP_WIDGET_ORIGINS": "https://shop.example.com/chat"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "CSP_WIDGET_ORIGINS entry 'https://shop.example.com/chat' is not an origin" in result.stderr, result.stderr


# --- the /widget/ page ---


@pytest.mark.django_db
def test_by_default_only_the_platform_itself_may_frame_the_widget(client):
    response = client.get("/widget/")
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == "frame-ancestors 'self'"
    assert "X-Frame-Options" not in response


@pytest.mark.django_db
def test_the_listed_origins_may_frame_the_widget_and_every_other_page_keeps_deny(client, settings):
    settings.CSP_WIDGET_ORIGINS = [SHOP, "http://127.0.0.1:8080"]
    response = client.get("/widget/")
    assert response["Content-Security-Policy"] == "frame-ancestors 'self' https://shop.example.com http://127.0.0.1:8080"
    assert "X-Frame-Options" not in response
    for url in ("/", "/chat/", "/admin/login/"):
        other = client.get(url)
        assert other["X-Frame-Options"] == "DENY" and "Content-Security-Policy" not in other, url


@pytest.mark.django_db
def test_the_frame_posts_messages_only_to_an_origin_allowed_to_frame_it(client, settings):
    settings.CSP_WIDGET_ORIGINS = [SHOP]
    assert _config(client.get("/widget/", {"origin": SHOP}))["parentOrigin"] == SHOP
    assert _config(client.get("/widget/", {"origin": "HTTPS://SHOP.EXAMPLE.COM"}))["parentOrigin"] == SHOP
    assert _config(client.get("/widget/", {"origin": "http://testserver"}))["parentOrigin"] == "http://testserver"  # the platform
    for origin in ("https://evil.example", "http://shop.example.com", "https://shop.example.com:8443", "*", ""):
        assert _config(client.get("/widget/", {"origin": origin}))["parentOrigin"] is None, origin


@pytest.mark.django_db
def test_the_widget_is_the_chat_page_with_the_sites_title_greeting_and_colour_and_no_site_header(client):
    body = client.get("/widget/", {"title": "小店 <客服>", "greeting": "欢迎光临！<b>hi</b>", "color": "#0F766E"}).content.decode()
    for part in ('id="chat-log"', 'id="chat-input"', 'id="chat-send"', 'id="chat-stop"', 'id="chat-person"', 'id="chat-new"'):
        assert part in body
    assert 'class="site-header"' not in body and 'id="language-select"' not in body
    assert '<h1 class="chat-title" id="chat-title">小店 &lt;客服&gt;</h1>' in body
    assert "<title>小店 &lt;客服&gt;</title>" in body and 'data-title="小店 &lt;客服&gt;"' in body
    assert '<p class="chat-empty" id="chat-empty">欢迎光临！&lt;b&gt;hi&lt;/b&gt;</p>' in body
    assert "--accent: #0F766E;" in body


@pytest.mark.django_db
def test_without_options_the_widget_shows_the_chat_pages_own_title_and_greeting(client):
    body = client.get("/widget/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert '<h1 class="chat-title" id="chat-title">Customer service</h1>' in body
    assert "Hello! Ask us anything about your orders" in body
    assert "--accent" not in body


@pytest.mark.django_db
@pytest.mark.parametrize("color", ["red", "#12345", "#0f766e; background: url(//evil)", "#0f766e}", "javascript:1"])
def test_a_colour_that_is_not_a_hex_code_is_ignored(client, color):
    body = client.get("/widget/", {"color": color}).content.decode()
    assert "--accent" not in body and "evil" not in body


@pytest.mark.django_db
def test_the_widget_speaks_the_language_the_site_names_and_its_socket_too(client):
    response = client.get("/widget/", {"lang": "en"}, HTTP_ACCEPT_LANGUAGE="zh-CN")
    body = response.content.decode()
    assert '<html lang="en">' in body and response["Content-Language"] == "en"
    assert 'data-open="Open the chat"' in body and 'data-close="Close the chat"' in body and "New conversation" in body
    assert _config(response)["wsPath"] == "/ws/chat/?lang=en"

    default = client.get("/widget/", {"lang": "fr"}, HTTP_ACCEPT_LANGUAGE="zh-CN")
    assert '<html lang="zh-hans">' in default.content.decode() and _config(default)["wsPath"] == "/ws/chat/?lang=zh-hans"


def test_the_socket_takes_the_language_its_page_names_before_cookie_and_header(settings):
    cookies = {settings.LANGUAGE_COOKIE_NAME: "zh-hans"}
    assert scope_language({"cookies": cookies, "headers": [], "query_string": b"lang=en"}) == "en"
    assert scope_language({"cookies": cookies, "headers": [], "query_string": b"lang=xx"}) == "zh-hans"
    assert scope_language({"cookies": {}, "headers": [(b"accept-language", b"en")], "query_string": b""}) == "en"


@pytest.mark.django_db
def test_the_widget_loads_only_the_platforms_own_assets(client):
    body = client.get("/widget/").content.decode()
    assert "http://" not in body and "https://" not in body
    assets = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', body)
    assert {"/static/js/chat.js", "/static/js/widget-frame.js", "/static/css/chat.css", "/static/css/widget-frame.css"} <= set(assets)
    assert all(asset.startswith("/static/") for asset in assets), assets


@pytest.mark.django_db
def test_the_widget_shows_the_history_of_the_sessions_own_conversation_only(client):
    client.get("/widget/")
    mine = Conversation.objects.create(session_key=client.session.session_key)
    Message.objects.create(conversation=mine, role="user", text="如何退货？")
    stranger = Conversation.objects.create(session_key="another-session")

    assert _config(client.get("/widget/", {"conversation": mine.pk}))["history"][0]["text"] == "如何退货？"
    assert _config(client.get("/widget/", {"conversation": stranger.pk}))["history"] == []


# --- the widget token: the frame's identity when no session cookie reaches it ---


def _widget_key(client, **params):
    """A fresh widget identity, as the frame gets it: (its token, its key)."""
    token = _config(client.get("/widget/", params))["widgetToken"]
    return token, widget.widget_key(token)


@pytest.mark.django_db
def test_a_widget_token_shows_its_own_conversations_history_only(client):
    token, key = _widget_key(client)
    other_token, other_key = _widget_key(client)
    assert key.startswith("widget-") and other_key.startswith("widget-") and key != other_key
    mine = Conversation.objects.create(session_key=key)
    Message.objects.create(conversation=mine, role="user", text="如何退货？")
    theirs = Conversation.objects.create(session_key=other_key)
    Message.objects.create(conversation=theirs, role="user", text="我的订单")

    stranger = Client()  # another browser: no cookie of the one that made the token, as a frame on another site
    config = _config(stranger.get("/widget/", {"token": token, "conversation": mine.pk}))
    assert config["conversation"] == str(mine.pk) and config["history"][0]["text"] == "如何退货？"
    assert widget.widget_key(config["widgetToken"]) == key  # the same identity, its token renewed
    assert _config(stranger.get("/widget/", {"token": token, "conversation": theirs.pk}))["history"] == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    "forge",
    [
        lambda token, key: token[:-2] + ("AA" if not token.endswith("AA") else "BB"),  # the signature altered
        lambda token, key: signing.dumps(key, salt="another.salt"),  # signed for something else
        lambda token, key: signing.dumps(key, salt=widget.TOKEN_SALT, key="not-the-secret-key"),
        lambda token, key: signing.dumps("a-session-key-12345", salt=widget.TOKEN_SALT),  # not a widget key
        lambda token, key: key,  # the key itself, unsigned
    ],
)
def test_a_forged_widget_token_is_refused_and_a_new_identity_given(client, forge):
    token, key = _widget_key(client)
    mine = Conversation.objects.create(session_key=key)
    Message.objects.create(conversation=mine, role="user", text="如何退货？")
    forged = forge(token, key)

    config = _config(Client().get("/widget/", {"token": forged, "conversation": mine.pk}))
    assert config["history"] == [] and config["conversation"] is None
    assert config["widgetToken"] not in (forged, token) and widget.widget_key(config["widgetToken"]) != key
    assert widget.widget_key(forged) is None


@pytest.mark.django_db
def test_the_chat_page_keeps_to_the_session_and_ignores_a_widget_token(client):
    token, key = _widget_key(client)
    widgets = Conversation.objects.create(session_key=key)
    Message.objects.create(conversation=widgets, role="user", text="widget's")
    client.get("/")
    sessions = Conversation.objects.create(session_key=client.session.session_key)
    Message.objects.create(conversation=sessions, role="user", text="session's")

    for path in ("/", "/chat/"):
        assert _config(Client().get(path, {"token": token, "conversation": widgets.pk}))["history"] == [], path
        config = _config(client.get(path, {"token": token, "conversation": sessions.pk}))
        assert config["history"][0]["text"] == "session's" and "widgetToken" not in config, path


@pytest.mark.django_db(transaction=True)
def test_the_socket_takes_a_widget_token_for_its_own_conversations_and_refuses_a_forged_one(client):
    from channels.testing import WebsocketCommunicator

    from csplatform.asgi import application

    token, key = _widget_key(client)
    _other_token, other_key = _widget_key(client)
    mine = Conversation.objects.create(session_key=key)
    theirs = Conversation.objects.create(session_key=other_key)
    origin = [(b"origin", b"http://localhost")]

    async def scenario():
        replies = []
        communicator = WebsocketCommunicator(application, "/ws/chat/?lang=en&token=" + quote(token), headers=origin)
        assert (await communicator.connect())[0]
        for conversation in (mine, theirs):
            await communicator.send_json_to({"type": "join", "conversation": str(conversation.pk)})
            replies.append(await communicator.receive_json_from(timeout=10))
        await communicator.send_json_to({"type": "handoff"})  # starts a conversation: the widget's
        replies.append(await communicator.receive_json_from(timeout=10))
        await communicator.disconnect()

        for forged in (token[:-2] + ("AA" if not token.endswith("AA") else "BB"), key, signing.dumps(key, salt="another.salt")):
            refused = WebsocketCommunicator(application, "/ws/chat/?token=" + quote(forged), headers=origin)
            connected, _ = await refused.connect()
            replies.append(connected)
        return replies

    joined, refused, started, *forged = asyncio.run(scenario())
    assert joined == {"type": "handoff", "state": "bot", "conversation": str(mine.pk)}
    assert refused["type"] == "error" and refused["code"] == "not_found"
    assert Conversation.objects.get(pk=started["conversation"]).session_key == key
    assert forged == [False, False, False]


# --- in Chromium: a shop's page on another origin ---


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def shop_page(tmp_path, name, body, host="127.0.0.1"):
    """A page of another origin: python's http.server on a free port serving index.html = body
    (a callable of the server's own origin), addressed as http://<host>:<port> (listening on
    127.0.0.1: "localhost" names it as another site than the platform's 127.0.0.1)."""
    folder = tmp_path / name
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    origin = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin, lambda platform: (folder / "index.html").write_text(body(platform), encoding="utf-8")
    finally:
        server.shutdown()
        server.server_close()


def _snippet(platform):
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>A shop</title></head>
<body><h1>A shop</h1><p>Products…</p>
<script src="{platform}/static/csp/widget.js" data-title="Shop help" data-color="#0f766e"
        data-greeting="Welcome to the shop!" data-lang="en" async></script>
</body></html>"""


WIDGET = "document.getElementById('csplatform-widget')"


def _part(driver, selector):
    return driver.execute_script(f"return {WIDGET}.shadowRoot.querySelector(arguments[0])", selector)


def _widget_ready(driver):
    _wait(driver, _script(f"var w = {WIDGET}; return w !== null && w.dataset.ready === 'true' && getComputedStyle(w).display !== 'none'"),
          message="the widget's button did not appear")


def _in_frame(driver):
    driver.switch_to.default_content()
    driver.switch_to.frame(_part(driver, "iframe"))


def _open(driver):
    from selenium.webdriver.common.by import By

    driver.switch_to.default_content()
    _part(driver, ".bubble").click()
    _in_frame(driver)
    _wait(driver, _script("return document.getElementById('chat-status').dataset.state === 'online'"), message="not connected")
    _wait(driver, lambda d: d.switch_to.active_element.get_attribute("id") == "chat-input", message="the message field has no focus")
    return driver.find_element(By.ID, "chat-input")


@pytest.fixture
def shops(tmp_path):
    """Two shops' pages, each with the widget's snippet: the first is in CSP_WIDGET_ORIGINS."""
    with shop_page(tmp_path, "listed", _snippet) as listed, shop_page(tmp_path, "unlisted", _snippet) as unlisted:
        yield listed, unlisted


@pytest.fixture
def platform(shops, training_env, tiny_model, faq):
    """A daphne that answers the sample questions with their curated answers (no adapter needed) and
    lets the first shop frame its widget."""
    from knowledge.models import QAPair

    for record in faq:
        QAPair.objects.create(instruction=record["instruction"], output=record["output"], status=QAPair.Status.APPROVED)
    (listed_origin, write_listed), (_unlisted_origin, write_unlisted) = shops
    env = {"CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model), "CSP_GROUNDING": "true",
           "CSP_WIDGET_ORIGINS": listed_origin}
    with live_daphne(env=env, log=training_env / "daphne.log") as url:
        write_listed(url)
        write_unlisted(url)
        yield url


@pytest.mark.django_db(transaction=True)
@pytest.mark.live
@pytest.mark.browser
@pytest.mark.grounded
def test_a_shops_page_opens_the_chat_gets_a_streamed_curated_answer_and_keeps_it_across_reloads(platform, shops, browser, faq):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    (shop, _), _unlisted = shops
    browser.get(shop + "/")
    _widget_ready(browser)
    bubble = _part(browser, ".bubble")
    panel = _part(browser, ".panel")
    assert bubble.get_attribute("aria-expanded") == "false" and bubble.get_attribute("aria-label") == "Open the chat"
    assert bubble.get_attribute("aria-controls") == "panel" and not panel.is_displayed()
    assert _part(browser, ".title").get_attribute("textContent") == "Shop help"
    assert _part(browser, ".close").get_attribute("aria-label") == "Close the chat"
    assert browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor", bubble) == "rgb(15, 118, 110)"

    # Keyboard: the button is reachable with Tab and opens the chat with Enter, the field gets the focus.
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.execute_script(f"return {WIDGET}.shadowRoot.activeElement") == bubble
    bubble.send_keys(Keys.ENTER)
    assert bubble.get_attribute("aria-expanded") == "true" and panel.is_displayed()
    _in_frame(browser)
    _wait(browser, _script("return document.getElementById('chat-status').dataset.state === 'online'"), message="not connected")
    _wait(browser, lambda d: d.switch_to.active_element.get_attribute("id") == "chat-input", message="the message field has no focus")
    assert browser.find_element(By.ID, "chat-empty").text == "Welcome to the shop!"

    browser.execute_script(WATCH_ANSWERS)
    field = browser.find_element(By.ID, "chat-input")
    field.send_keys(faq[3]["instruction"], Keys.ENTER)
    _wait(browser, _script("return document.querySelectorAll('#chat-log .msg-bot[data-state=done]').length === 1"), message="no answer")
    answer = browser.find_element(By.CSS_SELECTOR, "#chat-log .msg-bot")
    assert answer.find_element(By.CSS_SELECTOR, ".msg-text").text == faq[3]["output"]
    assert any(streaming for _text, streaming in browser.execute_script("return window.seen"))  # start, tokens, done
    assert answer.find_elements(By.CSS_SELECTOR, 'button.rate[data-rating="1"]') and answer.find_elements(By.CSS_SELECTOR, "button.rate[data-rating='-1']")
    conversation = Conversation.objects.get()
    assert browser.execute_script("return sessionStorage.getItem('csplatform.chat.conversation')") == str(conversation.pk)

    # Escape in the chat closes the panel and gives the focus back to the button.
    field.send_keys(Keys.ESCAPE)
    browser.switch_to.default_content()
    _wait(browser, lambda d: not panel.is_displayed(), message="Escape did not close the panel")
    assert bubble.get_attribute("aria-expanded") == "false"
    assert browser.execute_script(f"return {WIDGET}.shadowRoot.activeElement") == bubble

    # A staff reply while closed: a badge counts it, the button says so; opening clears it.
    _in_frame(browser)
    browser.execute_script("window.csplatformChat.handleFrame({type: 'agent', text: 'Hello, this is Wang from the shop.'})")
    browser.switch_to.default_content()
    badge = _part(browser, ".badge")
    _wait(browser, lambda d: badge.is_displayed() and badge.text == "1", message="no unread badge")
    assert bubble.get_attribute("aria-label") == "Open the chat (1 new messages)"
    bubble.click()
    assert not badge.is_displayed() and bubble.get_attribute("aria-label") == "Open the chat"
    _part(browser, ".close").click()
    assert not panel.is_displayed()

    # A reload of the shop's page: the conversation is still there, and goes on.
    browser.refresh()
    _widget_ready(browser)
    field = _open(browser)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .msg-user")) == 1, message="no history after the reload")
    assert browser.find_element(By.CSS_SELECTOR, "#chat-log .msg-bot .msg-text").text == faq[3]["output"]
    field.send_keys(faq[4]["instruction"], Keys.ENTER)
    _wait(browser, _script("return document.querySelectorAll('#chat-log .msg-bot[data-state=done]').length === 2"), message="no second answer")
    assert Conversation.objects.get().pk == conversation.pk and conversation.messages.count() == 4

    # A phone: the open chat fills the screen.
    browser.switch_to.default_content()
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 375, "height": 740, "deviceScaleFactor": 1, "mobile": True})
    rect = browser.execute_script("var r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height]", _part(browser, ".panel"))
    assert rect == [0, 0, 375, 740], rect


@pytest.mark.django_db(transaction=True)
@pytest.mark.live
@pytest.mark.browser
@pytest.mark.grounded
def test_a_page_of_an_origin_not_listed_gets_a_refused_frame_and_no_button(platform, shops, browser):
    from selenium.webdriver.common.by import By

    (listed, _), (unlisted, _) = shops
    with urllib.request.urlopen(platform + "/widget/?origin=" + unlisted) as response:  # noqa: S310 (the live test server)
        assert response.headers["Content-Security-Policy"] == f"frame-ancestors 'self' {listed}"
        assert response.headers["X-Frame-Options"] is None
        assert '"parentOrigin": null' in response.read().decode()

    browser.get(unlisted + "/")
    _wait(browser, _script(f"return {WIDGET} !== null && {WIDGET}.shadowRoot.querySelector('iframe') !== null"))
    _in_frame(browser)
    # Chromium shows its own error page in place of the refused one: nothing of the chat is there.
    _wait(browser, _script("return location.href !== 'about:blank' && document.readyState === 'complete'"), message="the frame never settled")
    assert not browser.find_elements(By.ID, "chat-log")
    assert browser.execute_script("return location.href") == "chrome-error://chromewebdata/"
    browser.switch_to.default_content()
    assert browser.execute_script(f"return {WIDGET}.dataset.ready") is None
    assert browser.execute_script(f"return getComputedStyle({WIDGET}).display") == "none"


@pytest.fixture
def other_site_shop(tmp_path, training_env, tiny_model, faq):
    """A shop's page on http://localhost:<port>, another site than the platform's 127.0.0.1 (sites
    are registrable domains, ports aside): the browser sends no SameSite=Lax cookie to its frame.
    Yields (the shop's origin, the platform's url)."""
    from knowledge.models import QAPair

    for record in faq:
        QAPair.objects.create(instruction=record["instruction"], output=record["output"], status=QAPair.Status.APPROVED)
    with shop_page(tmp_path, "other-site", _snippet, host="localhost") as (shop, write):
        env = {"CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model), "CSP_GROUNDING": "true", "CSP_WIDGET_ORIGINS": shop}
        with live_daphne(env=env, log=training_env / "daphne.log") as url:
            write(url)
            yield shop, url


@pytest.mark.django_db(transaction=True)
@pytest.mark.live
@pytest.mark.browser
@pytest.mark.grounded
def test_a_shop_on_another_site_keeps_the_conversation_across_reloads(other_site_shop, browser, faq):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shop, platform = other_site_shop
    assert shop.startswith("http://localhost:") and platform.startswith("http://127.0.0.1:")
    browser.get(shop + "/")
    _widget_ready(browser)
    field = _open(browser)
    field.send_keys(faq[3]["instruction"], Keys.ENTER)
    _wait(browser, _script("return document.querySelectorAll('#chat-log .msg-bot[data-state=done]').length === 1"), message="no answer")
    conversation = Conversation.objects.get()

    browser.refresh()
    _widget_ready(browser)
    field = _open(browser)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .msg-user")) == 1, message="no history after the reload")
    assert browser.find_element(By.CSS_SELECTOR, "#chat-log .msg-user .msg-bubble").text == faq[3]["instruction"]
    assert browser.find_element(By.CSS_SELECTOR, "#chat-log .msg-bot .msg-text").text == faq[3]["output"]
    field.send_keys(faq[4]["instruction"], Keys.ENTER)
    _wait(browser, _script("return document.querySelectorAll('#chat-log .msg-bot[data-state=done]').length === 2"), message="no second answer")
    assert Conversation.objects.get().pk == conversation.pk and conversation.messages.count() == 4


@pytest.fixture
def redis_platform(shops, redis_channel_layer, training_env, tiny_model):
    """A daphne on channels-redis (this process on the same layer: a staff reply made here reaches
    the frame) that lets the first shop frame its widget."""
    (listed_origin, write_listed), _unlisted = shops
    env = {"CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model), "CSP_WIDGET_ORIGINS": listed_origin, **redis_channel_layer}
    with live_daphne(env=env, log=training_env / "daphne.log") as url:
        write_listed(url)
        yield url


@pytest.mark.django_db(transaction=True)
@pytest.mark.live
@pytest.mark.browser
@pytest.mark.services
def test_a_staff_reply_reaches_the_closed_widget_as_an_unread_badge_and_shows_when_opened(redis_platform, shops, browser, staff_user):
    from selenium.webdriver.common.by import By

    from chat import handoff

    (shop, _), _unlisted = shops
    browser.get(shop + "/")
    _widget_ready(browser)
    _open(browser)
    browser.find_element(By.ID, "chat-person").click()
    _wait(browser, lambda d: d.find_element(By.ID, "chat-handoff").get_attribute("data-state") == "waiting", message="not waiting")
    conversation = Conversation.objects.get()
    browser.switch_to.default_content()
    _part(browser, ".close").click()

    handoff.handoff_reply(conversation=conversation, agent=staff_user, text="您好，我是客服小王。")
    badge, bubble = _part(browser, ".badge"), _part(browser, ".bubble")
    _wait(browser, lambda d: badge.is_displayed() and badge.text == "1", message="no unread badge for the staff reply")
    assert bubble.get_attribute("aria-label") == "Open the chat (1 new messages)"
    bubble.click()
    assert not badge.is_displayed()
    _in_frame(browser)
    assert browser.find_element(By.CSS_SELECTOR, "#chat-log .msg-agent .msg-bubble").text == "您好，我是客服小王。"
