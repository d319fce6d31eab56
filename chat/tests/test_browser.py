"""The chat page end to end: headless Chromium against a real daphne serving the trained adapter.

Needs Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`; .ci/run
installs them); skipped without them.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings as django_settings
from django.db import connection

from chat.models import Conversation, Message

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.django_db(transaction=True)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _database_url():
    """The test database as a URL the server process can open."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user, password = quote(db["USER"] or "", safe=""), quote(db["PASSWORD"] or "", safe="")
    return f"postgres://{user}:{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def server(serving, training_env, tiny_model):
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "SECRET_KEY": django_settings.SECRET_KEY,
        "CSP_DATA_DIR": str(training_env),
        "CSP_BASE_MODEL": str(tiny_model),
        "CSP_CHAT_DEVICE": "cpu",
        "CSP_CHAT_DTYPE": "float32",
    }
    log = training_env / "daphne.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "csplatform.asgi:application"],
        cwd=ROOT, env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "daphne did not answer: " + log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
