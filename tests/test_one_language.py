"""One language per page (issue #15): the chat page and every admin page of the project's apps,
walked in headless Chromium in English and in Simplified Chinese, show no string of the other
language from the project's catalogue (locale/zh_Hans/LC_MESSAGES/django.po).

A live daphne serves the tiny model with its trained adapter (the server's default language is
zh-hans, as in production), so a string translated once at import time, or in the server's
language instead of the request's, shows up on the English pages. On each page the visible text
(body.innerText, plus placeholders and button values) is checked against the catalogue:

- English page: fails on a msgstr fragment of at least 2 CJK characters. A fragment is the text
  between the placeholders, tags and line breaks of a catalogue string, as interpolation leaves it
  on the page. The sample Q&A and the language switcher's names are Chinese data, not catalogue
  text, so a fragment found in any of them (or in a msgid) is not looked for: the test cannot tell
  it from the data it is part of. The admin history's messages count as data too: each is written
  once, in the language of whoever acted.
- Chinese page: fails on a translated msgid fragment of at least 2 words (of 2+ letters), as a
  whole phrase, ignoring case (the admin's CSS upper-cases some headings); fragments found in
  a msgstr (names kept as they are, "ROUGE-L F1") or in the data are not looked for. And it fails
  on any fragment of an untranslated entry (empty msgstr, or fuzzy: compilemessages leaves both
  out, so Django shows the English).

Needs Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`); skipped
without them.
"""

import ast
import json
import logging
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib import admin
from django.test import Client

from chat.tests.conftest import backend_settings
from knowledge import services as knowledge_services
from llm import evaluation
from tests.support.livetest import live_daphne
from training import canary
from training.compare_views import compare_url
from training.models import AdapterVersion, DatasetSnapshot, RetrainingPolicy
from training.tests.factories import make_adapter_version, make_base_model, make_run

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CATALOGUE = Path(settings.BASE_DIR) / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"
APPS = ("knowledge", "training", "chat")
LANGUAGES = ("en", "zh-hans")

# --- the catalogue ---


def read_po(path=CATALOGUE):
    """The .po file's entries as [(msgid, msgstr, translated)], one per msgid and one per plural
    msgid (with msgstr[0]: zh-hans has one form). `translated` is False for an empty or fuzzy
    msgstr. Obsolete entries (#~) and the header are left out."""
    entries, entry, key = [], {}, None

    def flush():
        msgstr = entry.get("msgstr", entry.get("msgstr[0]", ""))
        translated = bool(msgstr) and "fuzzy" not in entry.get("flags", "")
        for msgid in (entry.get("msgid"), entry.get("msgid_plural")):
            if msgid:
                entries.append((msgid, msgstr, translated))

    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        line = line.strip()
        if not line:
            if entry:
                flush()
            entry, key = {}, None
        elif line.startswith("#,"):
            entry["flags"] = entry.get("flags", "") + line[2:]
        elif line.startswith("#"):
            continue
        elif line.startswith('"'):
            entry[key] += ast.literal_eval(line)
        else:
            key, _space, literal = line.partition(" ")
            entry[key] = ast.literal_eval(literal)
    return entries


PIECE_BREAK = re.compile(r"%\(\w+\)[sdfr]|%[sdfr]|\{\w*\}|<[^>]*>|\n")


def fragments(text):
    """The pieces of a catalogue string that stand on the page as written, whitespace collapsed."""
    return [" ".join(piece.split()) for piece in PIECE_BREAK.split(text.replace("%%", "%")) if piece.strip()]


def cjk_count(text):
    return len(re.findall(r"[\u3400-\u9fff\uf900-\ufaff]", text))


def english_words(text):
    return re.findall(r"[A-Za-z]{2,}", text)


def forbidden_strings(data_texts):
    """{"en": [(fragment, msgid)], "zh-hans": [(pattern, fragment, msgid)]}: what each language's
    pages must not show (see the module docstring for the rule)."""
    entries = read_po()
    data = "\n".join(" ".join(text.split()) for text in data_texts)
    all_msgids = "\n".join(" ".join(msgid.split()) for msgid, _msgstr, _translated in entries)
    all_msgstrs = "\n".join(" ".join(msgstr.split()) for _msgid, msgstr, _translated in entries).lower()
    chinese, english = {}, {}
    for msgid, msgstr, translated in entries:
        for piece in fragments(msgstr) if translated else ():
            if cjk_count(piece) >= 2 and piece not in data and piece not in all_msgids:
                chinese.setdefault(piece, msgid)
        for piece in fragments(msgid):
            words = english_words(piece)
            if not words or piece.lower() in all_msgstrs or piece.lower() in data.lower():
                continue
            if len(words) >= 2 or not translated:
                english.setdefault(piece, msgid)
    return {
        "en": sorted(chinese.items()),
        "zh-hans": [
            (re.compile(r"(?<![A-Za-z])" + re.escape(piece) + r"(?![A-Za-z])", re.IGNORECASE), piece, msgid)
            for piece, msgid in sorted(english.items())
        ],
    }


def wrong_language(text, language, forbidden):
    """The catalogue strings of the other language that `text` (a page's visible text) shows:
    [(fragment, its msgid, the fragment with 40 characters either side)]."""
    text = " ".join(text.split())
    if language == "en":
        found = [(text.find(piece), len(piece), piece, msgid) for piece, msgid in forbidden["en"] if piece in text]
    else:
        found = [(m.start(), len(piece), piece, msgid) for pattern, piece, msgid in forbidden["zh-hans"] if (m := pattern.search(text))]
    return [(piece, msgid, text[max(0, at - 40) : at + length + 40]) for at, length, piece, msgid in found]


def test_the_rule_finds_the_other_languages_catalogue_strings_and_not_the_data():
    forbidden = forbidden_strings(["用户问：买的东西不想要了，可以退货吗？"])
    assert ("每日回答数", "Answers per day", "Analytics 每日回答数 12") in wrong_language("Analytics\n每日回答数 12", "en", forbidden)
    assert not wrong_language("Answers per day 12 用户问：买的东西不想要了，可以退货吗？", "en", forbidden)
    shown = wrong_language("分析 ANSWERS PER DAY 12", "zh-hans", forbidden)
    assert "Answers per day" in [msgid for _piece, msgid, _context in shown]
    assert not wrong_language("每日回答数 exact_match ROUGE-L F1 v1", "zh-hans", forbidden)


# --- the live pages ---

# Keeps every websocket the page opens in window.sockets, so the test can send a frame the page
# never sends and see how the server's error reads.
RECORD_SOCKETS = """
window.sockets = [];
var Native = window.WebSocket;
window.WebSocket = function (url, protocols) {
  var socket = protocols === undefined ? new Native(url) : new Native(url, protocols);
  window.sockets.push(socket);
  return socket;
};
window.WebSocket.prototype = Native.prototype;
window.WebSocket.OPEN = Native.OPEN;
"""
VISIBLE_TEXT = """
var parts = [document.body.innerText];
document.querySelectorAll('input[placeholder], textarea[placeholder]').forEach(function (e) { parts.push(e.placeholder); });
document.querySelectorAll('input[type=submit], input[type=button]').forEach(function (e) { parts.push(e.value); });
return parts.join('\\n');
"""


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_SOCKETS})
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, message, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def sample_records():
    records = []
    for path in settings.CSP_SAMPLE_DATA:
        records += json.loads(path.read_text(encoding="utf-8"))
    return records


@pytest.fixture
def platform(training_env, tiny_model, trained_adapter, faq, superuser):
    """The sample Q&A imported, the trained adapter active as v1 with a run evaluated as training
    evaluates (per mode, with sample answers), a second version v2 running as a canary beside it,
    and the retraining policy: a row for every model."""
    train = settings.CSP_SAMPLE_DATA[0]
    report = knowledge_services.qa_import(content=train.read_bytes(), filename=train.name, status="approved", user=superuser)
    assert report.ok, report.as_dict()
    served = [evaluation.ServedAnswer(pair["instruction"], "curated", pair["output"], ()) for pair in faq]
    results = evaluation.evaluate_served(served, [pair["output"] for pair in faq])
    results["samples"] = [{"question": a.question, "reference": a.text, "prediction": a.text, "mode": a.mode} for a in served]
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path=str(training_env / "snapshot"), train_count=6, dev_count=6)
    run = make_run(
        base_model=make_base_model(path=tiny_model), snapshot=snapshot, eval_results=results, total_steps=20, step=20,
        loss_history=[[step, 3.0 / step] for step in range(1, 21)], dev_loss_history=[[10, 0.5], [20, 0.2]],
    )
    active = make_adapter_version("v1", path=trained_adapter, run=run, is_active=True)
    second_run = make_run(base_model=run.base_model, snapshot=snapshot, eval_results=results)
    second = make_adapter_version("v2", path=trained_adapter, run=second_run)  # for the comparison page
    canary.canary_start(version=second, percent=10)  # the version list's canary panel, the analytics' two sides
    RetrainingPolicy.load()
    return training_env


@pytest.fixture
def server(platform, tiny_model):
    env = {"CSP_DATA_DIR": str(platform), "CSP_BASE_MODEL": str(tiny_model), **backend_settings("transformers")}
    with live_daphne(env=env, log=platform / "daphne.log") as url:
        yield url


def admin_pages(superuser):
    """Every admin page of the project's apps that a GET shows as HTML to a superuser: the index,
    each app's index, and each model admin's URLs (changelist, add and change forms, history, the
    custom views) with the model's first row where the URL takes one; the analytics page and the
    comparison of the first two versions."""
    first_two = AdapterVersion.objects.order_by("pk")[:2]
    paths = ["/admin/", "/admin/analytics/", *(f"/admin/{app}/" for app in APPS), compare_url(*first_two)]
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label not in APPS:
            continue
        first = model._default_manager.order_by("pk").first()
        prefix = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        for pattern in model_admin.get_urls():
            route = str(pattern.pattern)
            if "<" in route and first is None:
                continue
            paths.append(prefix + re.sub(r"<[^>]+>", str(first.pk if first else ""), route))
    client = Client()
    client.force_login(superuser)
    pages = []
    request_log = logging.getLogger("django.request")
    level, request_log.level = request_log.level, logging.ERROR  # the add and delete pages refused (403) are expected
    try:
        for path in dict.fromkeys(paths):
            response = client.get(path)
            if response.status_code == 200 and response["Content-Type"].startswith("text/html"):
                pages.append(path)
    finally:
        request_log.level = level
    return pages


@pytest.mark.django_db(transaction=True)
@pytest.mark.live
@pytest.mark.browser
def test_every_page_speaks_one_language(server, browser, superuser, faq):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from django.contrib.admin.models import LogEntry

    data = [*(value for record in sample_records() for value in record.values() if isinstance(value, str)),
            *(text for record in sample_records() for text in record.get("alternates", [])),
            *(name for _code, name in settings.LANGUAGES)]
    # The admin history shows each entry's message as written, in the language of whoever acted
    # (here the import, in English): a record, like the data.
    data += LogEntry.objects.values_list("change_message", flat=True)
    forbidden = forbidden_strings(data)
    login = Client()
    login.force_login(superuser)
    session = login.cookies[settings.SESSION_COOKIE_NAME].value
    problems = []

    def check(language, label):
        for piece, msgid, context in wrong_language(browser.execute_script(VISIBLE_TEXT), language, forbidden):
            problems.append(f"{language} {label}: shows {piece!r} (msgid {msgid!r}) in “{context}”")

    for language in LANGUAGES:
        browser.delete_all_cookies()
        browser.get(server + "/static/css/site.css")  # the site's origin, for its cookies
        browser.add_cookie({"name": settings.SESSION_COOKIE_NAME, "value": session, "path": "/"})
        browser.add_cookie({"name": settings.LANGUAGE_COOKIE_NAME, "value": language, "path": "/"})
        browser.execute_script("sessionStorage.clear()")

        # The chat: connected, one answer, 👍, a frame the server refuses, then asking for a person.
        browser.get(server + "/chat/")
        _wait(browser, lambda d: d.find_element(By.ID, "chat-status").get_attribute("data-state") == "online", "not connected")
        check(language, "/chat/ (connected)")
        field = browser.find_element(By.ID, "chat-input")
        field.send_keys(faq[0]["instruction"], Keys.ENTER)
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg-bot[data-state=done]"), "no answer")
        answer = browser.find_element(By.CSS_SELECTOR, "#chat-log .msg-bot")
        assert answer.find_element(By.CSS_SELECTOR, ".msg-text").text == faq[0]["output"]  # the data the page shows
        # 👍 in English, 👎 in Chinese: the review queue gets an answer to show.
        answer.find_element(By.CSS_SELECTOR, f'button.rate[data-rating="{1 if language == "en" else -1}"]').click()
        browser.execute_script("window.sockets[window.sockets.length - 1].send(JSON.stringify({type: 'shout'}))")
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg-note-error"), "no error note")
        check(language, "/chat/ (answered, refused frame)")
        browser.find_element(By.ID, "chat-person").click()
        _wait(browser, lambda d: d.find_element(By.ID, "chat-handoff").get_attribute("data-state") == "waiting", "not waiting")
        check(language, "/chat/ (waiting for a person)")
        browser.get(server + "/widget/")
        _wait(browser, lambda d: d.find_element(By.ID, "chat-status").get_attribute("data-state") == "online", "widget not connected")
        check(language, "/widget/")

    # The admin, once the chats above have made conversations, answers and a handoff to show.
    pages = admin_pages(superuser)
    assert {"/admin/analytics/", "/admin/training/trainingrun/start/", "/admin/knowledge/qapair/import/"} <= set(pages)
    second = AdapterVersion.objects.get(name="v2")
    assert second.is_canary  # the analytics page and the version list show the canary
    for needed in ("/handoff/", "/admin/chat/message/", "/admin/chat/reviewitem/", "/admin/training/adapterversion/compare/"):
        assert any(needed in page for page in pages), needed
    for language in LANGUAGES:
        browser.add_cookie({"name": settings.LANGUAGE_COOKIE_NAME, "value": language, "path": "/"})
        for page in pages:
            browser.get(server + page)
            assert browser.current_url == server + page, f"{page} went to {browser.current_url}"
            assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == language
            if page in ("/admin/analytics/", "/admin/training/adapterversion/"):
                assert browser.find_elements(By.CSS_SELECTOR, "#analytics-canary, #canary-panel"), f"{page} shows no canary"
            check(language, page)
        # The admin actions that ask on a page of their own before doing anything (POSTs: not in `pages`).
        for changelist, row, action, field in (
            ("/admin/knowledge/qapair/", "input.action-select", "move_to_category", "apply"),
            ("/admin/training/adapterversion/", f"input.action-select[value='{second.pk}']", "canary", "start_canary"),
        ):
            browser.get(server + changelist)
            browser.find_element(By.CSS_SELECTOR, row).click()
            Select(browser.find_element(By.CSS_SELECTOR, "select[name=action]")).select_by_value(action)
            browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
            _wait(browser, lambda d, field=field: d.find_elements(By.NAME, field), f"no form of the {action} action")
            check(language, f"{changelist} (action: {action})")

    assert not problems, f"{len(problems)} strings of the other language:\n" + "\n".join(problems)
