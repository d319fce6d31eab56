"""The chat page end to end: headless Chromium against a real daphne serving the trained adapter.

Needs Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`; .ci/run
installs them); skipped without them.
"""

import os
import time

import pytest

from chat.models import Conversation, Message
from chat.tests.conftest import backend_settings
from tests.support.livetest import live_daphne

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.live, pytest.mark.browser]


@pytest.fixture
def server(serving, training_env, tiny_model, backend):
    env = {"CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model), **backend_settings(backend)}
    with live_daphne(env=env, log=training_env / "daphne.log") as url:
        yield url


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900", "--lang=en-US"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"intl.accept_languages": "en-US,en"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout=30, message=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def _script(script, *args):
    return lambda driver: driver.execute_script(script, *args)


# Records the last answer's text at every change, and whether it was still streaming then.
WATCH_ANSWERS = """
window.seen = [];
new MutationObserver(function () {
  var rows = document.querySelectorAll('#chat-log .msg-bot');
  var row = rows[rows.length - 1];
  if (row) window.seen.push([row.querySelector('.msg-text').textContent, row.classList.contains('streaming')]);
}).observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true, attributes: true});
"""
LAST_ANSWER_DONE = "var r = document.querySelectorAll('#chat-log .msg-bot[data-state=done]'); return r.length >= arguments[0];"


def _ask(driver, text, answers_before):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, "chat-input")
    field.send_keys(text)
    field.send_keys(Keys.ENTER)  # Enter sends
    _wait(driver, _script(LAST_ANSWER_DONE, answers_before + 1), message="no finished answer")
    return driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg-bot")[-1]


def test_a_customer_chats_in_the_browser_with_streaming_feedback_and_history(server, browser, faq):
    from selenium.webdriver.common.by import By

    browser.get(server + "/chat/")
    _wait(browser, _script("return document.getElementById('chat-status').dataset.state === 'online'"), message="not connected")
    assert browser.find_element(By.ID, "chat-status").text == "Connected"

    # Shift+Enter is a newline, not a send.
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.ID, "chat-input")
    field.send_keys("a", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "b")
    assert field.get_attribute("value") == "a\nb" and not browser.find_elements(By.CSS_SELECTOR, ".msg-user")
    field.clear()

    browser.execute_script(WATCH_ANSWERS)
    answer = _ask(browser, faq[0]["instruction"], 0)

    assert answer.find_element(By.CSS_SELECTOR, ".msg-text").text == faq[0]["output"]
    growing = [text for text, streaming in browser.execute_script("return window.seen") if streaming and text]
    assert len(set(growing)) >= 2, growing  # the answer grew token by token before `done`
    assert all(faq[0]["output"].startswith(text) for text in growing)
    assert answer.find_element(By.CSS_SELECTOR, ".msg-time").text.startswith("Response time ")

    # 👍 is stored on the answer and shown as selected once the server acknowledges it.
    message_id = int(answer.get_attribute("data-message-id"))
    answer.find_element(By.CSS_SELECTOR, 'button.rate[data-rating="1"]').click()
    _wait(browser, lambda d: answer.find_element(By.CSS_SELECTOR, 'button.rate[data-rating="1"]').get_attribute("aria-pressed") == "true")
    assert answer.find_element(By.CSS_SELECTOR, 'button.rate[data-rating="-1"]').get_attribute("aria-pressed") == "false"
    deadline = time.monotonic() + 5
    while Message.objects.get(pk=message_id).rating != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Message.objects.get(pk=message_id).rating == 1

    # A second question continues the same conversation.
    _ask(browser, faq[1]["instruction"], 1)
    conversation = Conversation.objects.get()
    assert conversation.messages.count() == 4
    assert browser.execute_script("return sessionStorage.getItem('csplatform.chat.conversation')") == str(conversation.pk)

    # A reload shows the conversation again, rating included, and keeps talking in it.
    browser.refresh()
    _wait(browser, _script("return document.getElementById('chat-status').dataset.state === 'online'"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg-user")) == 2
    first = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg-bot")[0]
    assert first.find_element(By.CSS_SELECTOR, ".msg-text").text == faq[0]["output"]
    assert first.find_element(By.CSS_SELECTOR, 'button.rate[data-rating="1"]').get_attribute("aria-pressed") == "true"

    # Model output is text: markup in an answer is shown, never run.
    evil = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"
    browser.execute_script(
        "var chat = window.csplatformChat;"
        "chat.handleFrame({type: 'start', conversation: arguments[0], message: 999999, adapter: 'v1'});"
        "chat.handleFrame({type: 'token', text: arguments[1]});"
        "chat.handleFrame({type: 'done', message: 999999, latency_ms: 10, first_token_ms: 5, tokens: 3});",
        str(conversation.pk), evil,
    )
    time.sleep(0.3)
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg-bot")[-1].find_element(By.CSS_SELECTOR, ".msg-text").text == evil
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-log script, #chat-log img")

    # "New conversation" forgets the id and clears the view.
    browser.find_element(By.ID, "chat-new").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")
    assert browser.execute_script("return sessionStorage.getItem('csplatform.chat.conversation')") is None
    assert "conversation=" not in browser.current_url

    # At phone width nothing overflows sideways and the input and Send button stay on screen.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 375, "height": 740, "deviceScaleFactor": 1, "mobile": True})
    layout = browser.execute_script(
        "var send = document.getElementById('chat-send').getBoundingClientRect();"
        "return [document.documentElement.scrollWidth, innerWidth, send.right, send.bottom, innerHeight];"
    )
    scroll_width, width, send_right, send_bottom, height = layout
    assert scroll_width <= width == 375 and send_right <= width and send_bottom <= height, layout


@pytest.fixture
def redis_server(redis_channel_layer, training_env, tiny_model):
    """A daphne on channels-redis, and this process on the same layer: a staff reply made here
    reaches the page the browser holds there."""
    env = {"CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model), **redis_channel_layer}
    with live_daphne(env=env, log=training_env / "daphne.log") as url:
        yield url


def test_a_customer_asks_for_a_person_gets_the_reply_live_and_rates_the_conversation(redis_server, browser, staff_user):
    from selenium.webdriver.common.by import By

    from chat import handoff

    browser.get(redis_server + "/")
    _wait(browser, _script("return document.getElementById('chat-status').dataset.state === 'online'"), message="not connected")
    banner = browser.find_element(By.ID, "chat-handoff")
    assert not banner.is_displayed()

    browser.find_element(By.ID, "chat-person").click()
    _wait(browser, lambda d: banner.get_attribute("data-state") == "waiting", message="not waiting")
    assert "finding a person" in banner.text and not browser.find_element(By.ID, "chat-person").is_displayed()
    conversation = Conversation.objects.get()
    assert conversation.state == "waiting"

    handoff.handoff_reply(conversation=conversation, agent=staff_user, text="<b>您好</b>，我是客服小王。")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg-agent"), message="no agent reply")
    reply = browser.find_element(By.CSS_SELECTOR, "#chat-log .msg-agent .msg-bubble")
    assert reply.text == "<b>您好</b>，我是客服小王。"  # text, never markup
    assert banner.get_attribute("data-state") == "agent"

    handoff.handoff_close(conversation=conversation, agent=staff_user)
    _wait(browser, lambda d: banner.get_attribute("data-state") == "closed", message="not closed")
    browser.find_element(By.CSS_SELECTOR, '#chat-csat button[data-score="4"]').click()
    deadline = time.monotonic() + 10
    while Conversation.objects.get().csat != 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Conversation.objects.get().csat == 4
    _wait(browser, lambda d: not d.find_element(By.ID, "chat-csat").is_displayed(), message="rating not acknowledged")


@pytest.mark.grounded
def test_before_any_version_a_customer_gets_curated_answers_and_a_person_offered_when_the_knowledge_base_has_none(
    training_env, tiny_model, browser, faq
):
    from selenium.webdriver.common.by import By

    from knowledge.models import QAPair

    for record in faq:
        QAPair.objects.create(instruction=record["instruction"], output=record["output"], status=QAPair.Status.APPROVED)
    env = {
        "CSP_DATA_DIR": str(training_env), "CSP_BASE_MODEL": str(tiny_model), "CSP_GROUNDING": "true", "CSP_CHAT_SHOW_SOURCES": "true",
        # only a question asked word for word is sure: a paraphrase falls back, offering what came close
        "CSP_CURATED_THRESHOLD": "0.999", "CSP_FALLBACK_THRESHOLD": "0.5", "CSP_CONFIDENT_THRESHOLD": "off",
    }
    with live_daphne(env=env, log=training_env / "daphne.log") as url:
        browser.get(url + "/chat/")
        _wait(browser, _script("return document.getElementById('chat-status').dataset.state === 'online'"), message="not connected")
        curated = _ask(browser, faq[3]["instruction"], 0)
        assert curated.find_element(By.CSS_SELECTOR, ".msg-text").text == faq[3]["output"]
        assert faq[3]["instruction"] in curated.find_element(By.CSS_SELECTOR, ".msg-source").text
        assert not curated.find_elements(By.CSS_SELECTOR, ".msg-handoff, .msg-suggestion")

        unsure = _ask(browser, "退款一般几天能回到我卡里？", 1)
        assert unsure.find_element(By.CSS_SELECTOR, ".msg-suggestions").text.startswith("Did you mean:")
        next(b for b in unsure.find_elements(By.CSS_SELECTOR, ".msg-suggestion") if b.text == "退款多久能到账？").click()
        _wait(browser, _script(LAST_ANSWER_DONE, 3), message="the suggestion was not asked")
        asked = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg-user")[-1]
        assert asked.text.endswith("退款多久能到账？")  # sent as the customer's own message
        answered = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg-bot")[-1]
        assert answered.find_element(By.CSS_SELECTOR, ".msg-text").text == faq[1]["output"]

        # A reload shows the answers as they were shown live: the source, the offers under the fallback.
        browser.refresh()
        _wait(browser, _script("return document.getElementById('chat-status').dataset.state === 'online'"), message="not reconnected")
        shown = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg-bot")
        assert len(shown) == 3
        assert faq[3]["instruction"] in shown[0].find_element(By.CSS_SELECTOR, ".msg-source").text
        assert shown[1].find_element(By.CSS_SELECTOR, ".msg-handoff").text == "Talk to a person"
        assert "退款多久能到账？" in [b.text for b in shown[1].find_elements(By.CSS_SELECTOR, ".msg-suggestion")]

        unknown = _ask(browser, "你们卖二手汽车吗？", 3)
        offer = unknown.find_element(By.CSS_SELECTOR, ".msg-handoff")
        assert offer.text == "Talk to a person" and "person" in unknown.find_element(By.CSS_SELECTOR, ".msg-text").text
        offer.click()
        banner = browser.find_element(By.ID, "chat-handoff")
        _wait(browser, lambda d: banner.get_attribute("data-state") == "waiting", message="not waiting")
        assert Conversation.objects.get().state == "waiting"
        modes = list(Message.objects.filter(role="assistant").values_list("mode", flat=True).order_by("id"))
        assert modes == ["curated", "fallback", "curated", "fallback"]
