"""The README's pictures, taken from a live platform: `make screenshots` remakes docs/img/*.png.

    .venv/bin/python docs/screenshots.py               # into docs/img/
    .venv/bin/python docs/screenshots.py --out /tmp/x  # elsewhere

Everything happens in a temporary folder that is deleted at the end (its own SQLite database and
data folder; the caller's DATABASE_URL, REDIS_URL and CSP_* settings are ignored), so the pictures
never show, and never touch, anyone's own data:

1. the tiny random model of llm.tinymodel stands in for Gemma (built in seconds, nothing
   downloaded); `migrate` and `bootstrap --no-training` load the sample Q&A and create the
   superuser; `train --wait` trains a real run on the sample pairs, so the run page has a real
   loss chart: the tiny model's, ten epochs on the pairs as they are (CSP_RAFT off: RAFT's
   retrieved-context examples take minutes, and their mix of long and short answers draws a
   zigzag rather than a curve);
2. daphne serves that database, with the grounded chat showing its sources and a sample shop page
   (a second server on another port, in CSP_WIDGET_ORIGINS) embedding the widget;
3. a few customers chat through the chat websocket and rate answers 👍/👎 (one asks for a person),
   so the analytics page has numbers;
4. headless Chromium, 1200x800, in English, takes the chat page after a sample question got its
   curated answer, the shop page with the widget open on an answer, the run page at its loss chart
   (after logging in through the admin's login form) and the analytics page.

Needs the test requirements (selenium, websocket-client), Debian's chromium and chromium-driver, and
a Chinese font (fonts-wqy-microhei: the sample Q&A is Chinese) and an emoji font
(fonts-noto-color-emoji: 👍/👎), as .ci/run installs them.
"""

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the project's packages (llm, tests.support) import from the root

from tests.support.livetest import free_port, stop, wait_for_port  # noqa: E402
from tests.support.wsload import ChatClient  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1200, 800
PICTURES = ("chat.png", "widget.png", "training-run.png", "analytics.png")
ADMIN_USER = "admin"
STARTED = time.monotonic()
# A short run (about 15 s of steps on one core): enough steps for a falling loss curve, little
# time on the evaluation's generated answers.
TRAINING = ["--epochs", "10", "--batch-size", "8", "--learning-rate", "0.01", "--lora-r", "16", "--lora-alpha", "32"]
SHORT_RUN = {"CSP_RAFT": "false", "CSP_EVAL_MAX_PAIRS": "6", "CSP_EVAL_MAX_NEW_TOKENS": "32"}

# Indexes into data/train.json: the questions the chat page asks (its first answer gets a 👍), the
# one the widget asks, and the conversations held before the pictures, as (questions: indexes or
# text, ratings of their answers).
CHAT_QUESTIONS = (0, 18)
WIDGET_QUESTION = 3
OFF_TOPIC = "你们卖二手汽车吗？"  # the knowledge base has no answer: the fallback reply, which offers a person
CONVERSATIONS = [
    ([1, 2], [1, 1]),
    ([4], [1]),
    ([5, 6], [1, -1]),
    ([7], [-1]),
    ([OFF_TOPIC], [-1]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNG files go (default: docs/img)")
    out = parser.parse_args().out.resolve()
    missing = list(prerequisites_missing())
    if missing:
        sys.exit("docs/screenshots.py cannot run:\n  " + "\n  ".join(missing))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="csp-screenshots-") as tmp:
        take_screenshots(Path(tmp), out)
    for name in PICTURES:
        progress(f"{out / name}: {(out / name).stat().st_size / 1000:.0f} kB")


def prerequisites_missing():
    """What this machine lacks for truthful pictures, as instructions."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        yield "no Chromium: apt-get install chromium chromium-driver"
    for language, package in (("zh", "fonts-wqy-microhei"), ("und-zsye", "fonts-noto-color-emoji")):
        fonts = subprocess.run(["fc-list", f":lang={language}"], capture_output=True, text=True).stdout if shutil.which("fc-list") else ""
        if not fonts.strip():
            yield f"no font for :lang={language} (the pictures would show empty boxes): apt-get install {package}"


def take_screenshots(tmp, out):
    # The sample questions as a customer types them, without the records' `用户问：` ("the customer
    # asks:"), which retrieval folds away anyway.
    records = json.loads((ROOT / "data" / "train.json").read_text(encoding="utf-8"))
    questions = [record["instruction"].removeprefix("用户问：") for record in records]
    password = secrets.token_urlsafe(16)
    with shop_server(tmp / "shop") as (shop_origin, write_shop_page):
        progress("building the tiny model")
        env = platform_env(tmp, shop_origin, password)
        run_id = prepare(env)
        progress("starting daphne")
        with daphne(env, tmp / "daphne.log") as platform:
            write_shop_page(platform)
            progress("chatting")
            hold_conversations(platform, questions)
            progress("taking the pictures")
            with chromium() as browser:
                chat_picture(browser, platform, [questions[i] for i in CHAT_QUESTIONS], out / "chat.png")
                widget_picture(browser, shop_origin, questions[WIDGET_QUESTION], out / "widget.png")
                log_in(browser, platform, password)
                run_picture(browser, platform, run_id, out / "training-run.png")
                analytics_picture(browser, platform, out / "analytics.png")


def progress(text):
    print(f"[{time.monotonic() - STARTED:3.0f} s] {text}", flush=True)


def platform_env(tmp, shop_origin, password):
    """The environment of every platform process: this folder's database and data, nothing of the caller's."""
    from llm.tinymodel import build_tiny_model

    texts = []
    for name in ("train.json", "dev.json"):
        for record in json.loads((ROOT / "data" / name).read_text(encoding="utf-8")):
            texts += [record["instruction"], record["output"]]
    model = build_tiny_model(texts, tmp / "tiny-model")
    callers = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY")
    env = {name: value for name, value in os.environ.items() if not name.startswith("CSP_") and name not in callers}
    data = tmp / "var"
    data.mkdir()
    return {
        **env,
        "CSP_DATA_DIR": str(data),
        "DATABASE_URL": f"sqlite:///{data / 'db.sqlite3'}",
        "CSP_BASE_MODEL": str(model),
        "CSP_ADMIN_USER": ADMIN_USER,
        "CSP_ADMIN_PASSWORD": password,
        "CSP_LANGUAGE": "en",
        "CSP_CHAT_SHOW_SOURCES": "true",
        "CSP_WIDGET_ORIGINS": shop_origin,
        "CSP_INFERENCE_BACKEND": "transformers",
        "CSP_CHAT_DEVICE": "cpu",
        "CSP_TRAINING_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        **SHORT_RUN,
    }


def prepare(env):
    """Migrate, load the sample Q&A with the superuser, and train a run; its id."""
    progress("migrating a fresh database, loading the sample Q&A")
    manage(env, "migrate", "--no-input", "-v0")
    manage(env, "bootstrap", "--no-training")
    progress("training a run")
    trained = manage(env, "train", "--wait", *TRAINING)
    return int(re.search(r"Training run #(\d+)", trained).group(1))


def manage(env, *arguments):
    result = subprocess.run([sys.executable, "manage.py", *arguments], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"manage.py {' '.join(arguments)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


@contextlib.contextmanager
def daphne(env, log):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "csplatform.asgi:application"],
        cwd=ROOT, env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def shop_server(folder):
    """A shop's site on its own port (another origin than the platform): (its origin, a function
    that writes its page for a platform's address)."""
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", lambda platform: (folder / "index.html").write_text(
            SHOP_PAGE.replace("{platform}", platform), encoding="utf-8"
        )
    finally:
        server.shutdown()
        server.server_close()


SHOP_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Tea &amp; Cups</title>
<style>
  body { margin: 0; font-family: system-ui, sans-serif; color: #1f2937; background: #f8fafc; }
  header { background: #0f766e; color: #fff; padding: 18px 40px; display: flex; justify-content: space-between; align-items: center; }
  header h1 { margin: 0; font-size: 24px; }
  nav a { color: #fff; margin-left: 24px; text-decoration: none; }
  main { padding: 32px 40px; }
  .products { display: grid; grid-template-columns: repeat(3, 220px); gap: 24px; }
  .product { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12); padding: 16px; }
  .picture { height: 120px; border-radius: 6px; margin-bottom: 12px; }
  .price { color: #0f766e; font-weight: 600; }
</style></head>
<body>
<header><h1>Tea &amp; Cups</h1><nav><a href="#">Shop</a><a href="#">Delivery</a><a href="#">Returns</a></nav></header>
<main>
  <h2>New this week</h2>
  <div class="products">
    <div class="product"><div class="picture" style="background:#99f6e4"></div>Longjing green tea, 250 g<p class="price">¥ 88</p></div>
    <div class="product"><div class="picture" style="background:#fde68a"></div>Porcelain cup set<p class="price">¥ 129</p></div>
    <div class="product"><div class="picture" style="background:#fecaca"></div>Travel tea flask<p class="price">¥ 69</p></div>
    <div class="product"><div class="picture" style="background:#c7d2fe"></div>Oolong sampler<p class="price">¥ 56</p></div>
    <div class="product"><div class="picture" style="background:#bbf7d0"></div>Bamboo tea tray<p class="price">¥ 149</p></div>
  </div>
</main>
<script src="{platform}/static/csp/widget.js" data-title="Tea &amp; Cups help" data-color="#0f766e"
        data-greeting="Welcome! Ask us about orders, delivery and returns." data-lang="en" async></script>
</body></html>
"""


def hold_conversations(platform, sample_questions):
    """CONVERSATIONS through the chat websocket, one socket each, their answers rated as listed;
    the off-topic one also asks for a person."""
    for questions, ratings in CONVERSATIONS:
        client = ChatClient(platform)
        try:
            for question, rating in zip(questions, ratings):
                text = question if isinstance(question, str) else sample_questions[question]
                exchange = client.ask(text, hang_after=60)
                if exchange.done is None:
                    sys.exit(f"no answer to {text!r}: {exchange}")
                client.send({"type": "feedback", "message": exchange.done["message"], "rating": rating})
                expect(client, "feedback")
                if exchange.done["handoff_offered"]:
                    client.send({"type": "handoff", "conversation": client.conversation})
                    expect(client, "handoff")
        finally:
            client.close()


def expect(client, kind):
    """Read frames until one of `kind` (the server's acknowledgement)."""
    while (frame := client.receive(30)) is not None:
        if frame.get("type") == kind:
            return frame
        if frame.get("type") == "error":
            sys.exit(f"the chat refused: {frame}")
    sys.exit(f"no {kind} frame from the chat")


@contextlib.contextmanager
def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                     f"--window-size={WIDTH},{HEIGHT}", "--lang=en-US"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"intl.accept_languages": "en-US,en"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        # The page's own size, whatever the window's frame takes: every picture is WIDTH x HEIGHT.
        metrics = {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, message, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def script(text, *arguments):
    return lambda driver: driver.execute_script(text, *arguments)


ONLINE = "return document.getElementById('chat-status').dataset.state === 'online'"
ANSWERS = "return document.querySelectorAll('#chat-log .msg-bot[data-state=done]').length"
WIDGET = "document.getElementById('csplatform-widget')"


def in_english(driver, platform):
    """The platform's pages in English for this browser (the language switcher's cookie, which the
    browser takes only on a page of the platform: a small one)."""
    driver.get(platform + "/static/csp/widget.css")
    driver.add_cookie({"name": "django_language", "value": "en", "path": "/"})


def ask(driver, question):
    """Type a question in the chat (page or frame) and wait for its whole answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait(driver, script(ONLINE), "the chat did not connect")
    before = driver.execute_script(ANSWERS)
    driver.find_element(By.ID, "chat-input").send_keys(question, Keys.ENTER)
    wait(driver, lambda d: d.execute_script(ANSWERS) > before, f"no answer to {question!r}")
    return driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg-bot")[-1]


def chat_picture(driver, platform, questions, path):
    from selenium.webdriver.common.by import By

    in_english(driver, platform)
    driver.get(platform + "/chat/")
    answers = [ask(driver, question) for question in questions]
    thumbs_up = answers[0].find_element(By.CSS_SELECTOR, 'button.rate[data-rating="1"]')
    thumbs_up.click()
    wait(driver, lambda d: thumbs_up.get_attribute("aria-pressed") == "true", "the 👍 was not acknowledged")
    driver.execute_script("document.activeElement.blur()")
    driver.save_screenshot(str(path))
    # The widget's frame is this origin in this tab, which would show the same conversation: start anew.
    driver.find_element(By.ID, "chat-new").click()


def widget_picture(driver, shop, question, path):
    driver.get(shop + "/")
    wait(driver, script(f"var w = {WIDGET}; return w !== null && w.dataset.ready === 'true'"), "the widget's button did not appear")
    driver.execute_script(f"return {WIDGET}.shadowRoot.querySelector('.bubble')").click()
    driver.switch_to.frame(driver.execute_script(f"return {WIDGET}.shadowRoot.querySelector('iframe')"))
    ask(driver, question)
    driver.switch_to.default_content()
    driver.save_screenshot(str(path))


def log_in(driver, platform, password):
    """Through the admin's login form, as staff do."""
    from selenium.webdriver.common.by import By

    driver.get(platform + "/admin/login/")
    driver.find_element(By.ID, "id_username").send_keys(ADMIN_USER)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form input[type=submit]").click()
    wait(driver, lambda d: "/admin/login/" not in d.current_url, "the admin login failed")


def run_picture(driver, platform, run_id, path):
    """The top of the run's page: its status, the loss chart and the start of its evaluation."""
    from selenium.webdriver.common.by import By

    driver.get(f"{platform}/admin/training/trainingrun/{run_id}/change/")
    driver.find_element(By.CSS_SELECTOR, "#run-progress svg")  # the chart is there
    driver.save_screenshot(str(path))


def analytics_picture(driver, platform, path):
    from selenium.webdriver.common.by import By

    driver.get(platform + "/admin/analytics/")
    driver.find_element(By.ID, "analytics-versions")  # the conversations above are counted
    driver.save_screenshot(str(path))


if __name__ == "__main__":
    main()
