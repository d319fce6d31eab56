"""Hardening scenarios of the fault/abuse suite (issue #6) that run in one process: CSRF, bad
bodies without memory growth, websocket origins, session isolation, racing training starts."""

import asyncio
import threading
import urllib.error
import urllib.request

import psutil

import pytest
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import Client

from rest_framework.authtoken.models import Token

from chat.models import Conversation
from csplatform.asgi import application
from tests.support.livetest import live_daphne
from knowledge.models import QAPair
from knowledge.tests.factories import make_pair
from training import services
from training.models import TrainingRun

pytestmark = pytest.mark.services


@pytest.mark.django_db
def test_session_writes_and_the_admin_login_need_the_csrf_token(staff_user):
    browser = Client(enforce_csrf_checks=True)
    assert browser.post("/admin/login/", {"username": "staff", "password": "staff-pass-123"}).status_code == 403
    browser.force_login(staff_user)
    refused = browser.post("/api/v1/qa-pairs/", {"instruction": "用户问：问？", "output": "答。"}, content_type="application/json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    page = browser.get("/admin/knowledge/qapair/add/")
    token = page.cookies["csrftoken"].value
    accepted = browser.post(
        "/api/v1/qa-pairs/", {"instruction": "用户问：问？", "output": "答。"}, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )
    assert accepted.status_code == 201 and QAPair.objects.count() == 1


@pytest.mark.live
@pytest.mark.django_db(transaction=True)
def test_bad_bodies_are_refused_without_memory_growth_of_a_live_server(staff_user, tmp_path):
    """Malformed JSON 400, wrong content type 415, a 3 MB body 413, all JSON; measured on a real
    daphne (in-process, pytest's log capture would keep every refused request alive)."""
    key = Token.objects.create(user=staff_user).key
    cases = [
        (b"{not json", "application/json", 400),
        (b"instruction=x", "text/plain", 415),
        (b"[" + b"1," * (1536 * 1024) + b"1]", "application/json", 413),  # 3 MB
    ]
    with live_daphne(env={"CSP_DATA_DIR": str(tmp_path)}, log=tmp_path / "daphne.log") as url:
        server = psutil.Process(_listening_pid(url))

        def round_of_tries(count):
            for _ in range(count):
                for body, content_type, expected in cases:
                    request = urllib.request.Request(
                        f"{url}/api/v1/qa-pairs/", data=body, method="POST",
                        headers={"Content-Type": content_type, "Authorization": f"Token {key}"},
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=30) as response:
                            status, kind = response.status, response.headers["Content-Type"]
                    except urllib.error.HTTPError as error:
                        status, kind = error.code, error.headers["Content-Type"]
                    assert (status, kind.split(";")[0]) == (expected, "application/json")

        round_of_tries(10)  # warm-up: lazily imported code, allocator pools
        before = server.memory_info().rss
        round_of_tries(100)
        grown = server.memory_info().rss - before
    print(f"server RSS after 300 refused requests (100 of them 3 MB): {grown / 1e6:+.1f} MB")
    assert grown < 30e6  # 100 kept 3 MB bodies alone would be 300 MB
    assert not QAPair.objects.exists()


def _listening_pid(url):
    """The pid of the daphne process serving url (a child of the process group we started)."""
    port = int(url.rsplit(":", 1)[1])
    for connection_info in psutil.net_connections(kind="tcp"):
        if connection_info.laddr and connection_info.laddr.port == port and connection_info.status == psutil.CONN_LISTEN:
            return connection_info.pid
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.django_db(transaction=True)
def test_evil_or_missing_origins_are_never_accepted():
    async def attempts(headers, count):
        accepted = 0
        for _ in range(count):
            communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
            connected, _ = await communicator.connect(timeout=5)
            accepted += bool(connected)
            if connected:
                await communicator.disconnect()
        return accepted

    async def scenario():
        return (
            await attempts([(b"origin", b"http://evil.example")], 100),
            await attempts([], 100),
            await attempts([(b"origin", b"http://localhost.evil.example")], 20),
            await attempts([(b"origin", b"http://localhost")], 3),
        )

    evil, missing, lookalike, good = asyncio.run(scenario())
    assert (evil, missing, lookalike) == (0, 0, 0)
    assert good == 3  # the check accepts the right origin, so the zeros above mean something


@pytest.mark.django_db
def test_one_hundred_anonymous_sessions_never_see_each_others_conversations():
    browsers = [Client() for _ in range(100)]
    mine = {}
    for index, browser in enumerate(browsers):
        browser.get("/")  # the page gives each browser its session
        key = browser.session.session_key
        mine[index] = Conversation.objects.create(session_key=key, title=f"会话{index}")
    crossed = 0
    for index, browser in enumerate(browsers):
        other = mine[(index + 1) % len(browsers)]
        page = browser.get(f"/?conversation={other.pk}")
        crossed += other.title in page.content.decode() or page.context["chat_config"]["conversation"] is not None
        own = browser.get(f"/?conversation={mine[index].pk}")
        assert own.context["chat_config"]["conversation"] == str(mine[index].pk)
    assert crossed == 0


@pytest.mark.django_db(transaction=True)
def test_simultaneous_training_starts_accept_exactly_one_each_time(training_env, monkeypatch):
    for _ in range(4):  # explicit train split: an automatic one could put a lone pair in dev (no train set)
        make_pair(status="approved", split="train")
    monkeypatch.setattr(services, "_enqueue", lambda run_id: None)  # the race is the point, not training
    # The precondition: no run in progress (a live server of an earlier test may have committed one).
    TrainingRun.objects.filter(status__in=TrainingRun.ACTIVE_STATUSES).update(status=TrainingRun.Status.CANCELLED)
    outcomes = []
    for _ in range(50):
        barrier = threading.Barrier(2)
        results = []

        def start():
            barrier.wait()
            try:
                services.training_run_start()
                results.append("accepted")
            except services.TrainingRefused as refusal:
                results.append("refused" if refusal.code == "busy" else f"refused ({refusal.code}: {refusal})")
            finally:
                connection.close()

        threads = [threading.Thread(target=start) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        outcomes.append(sorted(results))
        TrainingRun.objects.filter(status__in=TrainingRun.ACTIVE_STATUSES).update(status=TrainingRun.Status.CANCELLED)
    assert outcomes == [["accepted", "refused"]] * 50


@pytest.mark.django_db
def test_page_size_caps_hold_with_ten_thousand_pairs(staff_api, settings):
    QAPair.objects.bulk_create(
        QAPair(instruction=f"用户问：第{n}号问题？", output="答案。", question_hash=f"{n:064x}") for n in range(10_000)
    )
    for asked in ("100000", "-1", "0", "abc", str(settings.CSP_API_MAX_PAGE_SIZE + 1)):
        response = staff_api.get("/api/v1/qa-pairs/", {"page_size": asked})
        assert response.status_code == 200
        body = response.json()
        assert body["count"] == 10_000 and len(body["results"]) <= settings.CSP_API_MAX_PAGE_SIZE, asked
    last = staff_api.get("/api/v1/qa-pairs/", {"page_size": 200, "page": 50}).json()
    assert len(last["results"]) == 200 and last["next"] is None
