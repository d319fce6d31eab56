"""A canary rollout as the chat lives it (chat.canary): a new conversation's side comes from its id,
deterministically and in the canary's share; the answer pipeline pins the side's version on the
engine (both inference backends: llama.cpp serves the two adapters together); a conversation keeps
its version after a promote or a stop; the analytics page shows the two sides side by side."""

import random
import time
import uuid

import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse
from django.utils import timezone

from chat import analytics, canary
from chat.answering import Finished, Started, answer_astart, answer_start, ready_engine
from chat.models import Conversation, Message
from chat.serving import ACTIVE_CHECK_SECONDS
from training import canary as rollout
from training.models import AdapterVersion
from training.tests.factories import make_adapter_version

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def backend(request):
    """The pinned version must be served beside the active one on both local backends."""
    return request.param


def _ids(count, seed=0):
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(count)]


def test_a_conversation_ids_bucket_is_the_same_every_time_and_the_buckets_are_even():
    ids = _ids(20000)
    assert [canary.bucket(i) for i in ids[:50]] == [canary.bucket(uuid.UUID(str(i))) for i in ids[:50]]
    buckets = [canary.bucket(i) for i in ids]
    assert set(buckets) == set(range(100))
    for percent in (1, 10, 50, 90):
        share = sum(b < percent for b in buckets) / len(buckets)
        assert abs(share - percent / 100) < 0.015, (percent, share)


@pytest.fixture
def two_versions(tmp_path):
    """v1 active, v2 beside it (their adapter folders are not read: no answer is generated)."""
    v1 = make_adapter_version("v1", path=tmp_path / "v1", is_active=True, activated_at=timezone.now())
    return v1, make_adapter_version("v2", path=tmp_path / "v2", beside=v1)


def test_a_new_conversation_goes_to_the_canary_when_its_bucket_is_below_the_share(two_versions):
    v1, v2 = two_versions
    ids = _ids(2000, seed=1)
    assert {canary.side_of(i) for i in ids} == {(Conversation.Rollout.NONE, None)}  # no canary: nobody is pinned
    rollout.canary_start(version=v2, percent=30)
    sides = {i: canary.side_of(i) for i in ids}
    assert all(sides[i] == (("canary", v2) if canary.bucket(i) < 30 else ("active", v1)) for i in ids)
    assert 0.25 < sum(side == "canary" for side, _v in sides.values()) / len(ids) < 0.35
    assert sides == {i: canary.side_of(i) for i in ids}  # asked again: the same


def test_an_existing_conversation_is_pinned_only_to_the_version_it_started_on_during_a_canary(two_versions, customer):
    v1, v2 = two_versions
    on_canary = Conversation.objects.create(user=customer, rollout="canary", adapter_version=v2)
    before = Conversation.objects.create(user=customer, adapter_version=v1)
    assert canary.route(conversation_id=str(on_canary.pk), user=customer).pin == {"adapter": "v2", "adapter_path": v2.path}
    assert canary.route(conversation_id=str(before.pk), user=customer).pin == {}  # follows the active version
    assert canary.route(conversation_id=str(on_canary.pk), user=None, session_key="someone").pin == {}  # not theirs
    assert canary.route(conversation_id=str(on_canary.pk), user=customer, options={"adapter": None}).pin == {}  # the caller pinned


# --- the answer pipeline, with a real engine ---


@pytest.fixture
def canary_ready(serving, second_adapter):
    """v1 (the trained adapter) active, v2 (barely trained: other answers) to be the canary."""
    return serving, make_adapter_version("v2", path=second_adapter, beside=serving)


def _ask(customer, text, conversation=None):
    """One answer through the sync pipeline: (Started, Finished)."""
    session = answer_start(engine=ready_engine(), channel=Conversation.Channel.API, text=text, conversation_id=conversation, user=customer)
    events = list(session.events_sync())
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished), events[-1]
    return events[0], events[-1]


def _ask_until_on_side(customer, text, side, tries=20):
    """A new conversation on `side` (ids are random: a share below 100 needs a few tries)."""
    for _ in range(tries):
        started, finished = _ask(customer, text)
        if started.conversation.rollout == side:
            return started, finished
    raise AssertionError(f"no conversation on the {side} side in {tries} tries")


def test_the_pipeline_pins_the_conversations_version_and_keeps_it_after_a_stop(canary_ready, faq, customer):
    v1, v2 = canary_ready
    question = faq[0]["instruction"]
    rollout.canary_start(version=v2, percent=100)

    started, finished = _ask(customer, question)
    conversation = Conversation.objects.get(pk=started.conversation.pk)
    assert (conversation.rollout, conversation.adapter_version) == ("canary", v2)
    assert started.adapter == "v2" and finished.stats.adapter == "v2" and finished.answer.adapter_name == "v2"
    assert finished.text != faq[0]["output"]  # v1 memorised it word for word; v2 did not

    rollout.canary_stop()
    started, finished = _ask(customer, question, conversation=str(conversation.pk))
    assert started.adapter == "v2" and finished.answer.adapter_name == "v2"  # it stays on v2

    started, finished = _ask(customer, question)  # a new one: no canary, the active version
    assert started.adapter == "v1" and finished.text == faq[0]["output"]
    assert (started.conversation.rollout, started.conversation.adapter_version) == ("", v1)


def test_after_a_promote_each_side_keeps_its_version_and_new_conversations_get_the_promoted_one(canary_ready, faq, customer):
    v1, v2 = canary_ready
    question = faq[1]["instruction"]
    rollout.canary_start(version=v2, percent=1)
    on_active, _ = _ask_until_on_side(customer, question, "active")
    rollout.canary_start(version=v2, percent=100)
    on_canary, _ = _ask(customer, question)
    assert (on_active.adapter, on_canary.adapter) == ("v1", "v2")

    rollout.canary_promote()
    assert AdapterVersion.objects.get(is_active=True) == v2 and rollout.current_canary() is None
    started, finished = _ask(customer, question, conversation=str(on_active.conversation.pk))
    assert started.adapter == "v1" and finished.stats.adapter == "v1"  # still v1, no longer active
    assert _ask(customer, question, conversation=str(on_canary.conversation.pk))[0].adapter == "v2"
    # A new conversation follows the active version, which the process's engine looks up at most
    # ACTIVE_CHECK_SECONDS after the promote (a fast machine asks sooner than that).
    time.sleep(ACTIVE_CHECK_SECONDS + 0.1)
    assert _ask(customer, question)[0].adapter == "v2"


def test_the_event_loop_pipeline_pins_the_canary_too(canary_ready, faq, customer):
    _v1, v2 = canary_ready
    rollout.canary_start(version=v2, percent=100)

    async def ask():
        session = await answer_astart(channel=Conversation.Channel.WEB, text=faq[2]["instruction"], user=customer)
        return [event async for event in session.events()]

    # async_to_sync: its database calls run in this thread, inside the test's transaction.
    events = async_to_sync(ask)()
    assert events[0].adapter == "v2" and isinstance(events[-1], Finished) and events[-1].stats.adapter == "v2"
    assert Conversation.objects.get(pk=events[0].conversation.pk).rollout == "canary"


# --- analytics ---


def _answers(conversation, *rows):
    """Answer rows: (rating, mode, finish_reason, latency_ms)."""
    version = conversation.adapter_version
    for rating, mode, finish, latency in rows:
        Message.objects.create(
            conversation=conversation, role="assistant", text="…", adapter_version=version, adapter_name=version.name,
            rating=rating, mode=mode, finish_reason=finish, latency_ms=latency, first_token_ms=latency // 10,
        )


def test_analytics_show_the_two_sides_of_the_canary_side_by_side(two_versions, customer, staff_client):
    v1, v2 = two_versions
    assert analytics.rollout_report() is None  # never a canary: no section
    Conversation.objects.create(user=customer, adapter_version=v1)  # before the canary: not counted
    rollout.canary_start(version=v2, percent=20)
    active = Conversation.objects.create(user=customer, rollout="active", adapter_version=v1)
    asked = Conversation.objects.create(user=customer, rollout="active", adapter_version=v1, handoff_requested_at=timezone.now())
    tried = Conversation.objects.create(user=customer, rollout="canary", adapter_version=v2)
    _answers(active, (1, "grounded", "stop", 400), (1, "curated", "stop", 100))
    _answers(asked, (-1, "fallback", "stop", 100), (None, "curated", "corrected", 800))
    _answers(tried, (1, "grounded", "stop", 300), (-1, "fallback", "fallback", 500))

    report = analytics.rollout_report()
    assert (report["canary"], report["running"], report["percent"]) == ("v2", True, 20)
    on_active, on_canary = report["sides"]
    assert (on_active["side"], on_active["versions"], on_canary["versions"]) == ("active", ["v1"], ["v2"])
    assert (on_active["conversations"], on_active["answers"], on_canary["answers"]) == (2, 4, 2)
    assert on_active["thumbs_up_rate"] == 0.6667 and on_canary["thumbs_up_rate"] == 0.5
    assert on_active["handoff_rate"] == 0.5 and on_canary["handoff_rate"] == 0.0
    assert on_active["fallback_share"] == 0.25 and on_canary["fallback_share"] == 0.5
    assert on_active["guard_share"] == 0.25 and on_canary["guard_share"] == 0.5
    assert on_active["latency_ms_median"] == 100 and on_canary["latency_ms_p95"] == 500

    page = staff_client.get(reverse("admin-analytics"), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Canary: v2 on 20% of new conversations" in page and 'id="analytics-canary"' in page
    assert "<th>fallback replies</th><td>25.0%</td><td>50.0%</td>" in page
    assert reverse("admin:training_adapterversion_canary_promote") in page

    rollout.canary_promote()  # the split stays readable after the canary ended, without the buttons
    page = staff_client.get(reverse("admin-analytics"), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Last canary: v2 (ended)" in page and reverse("admin:training_adapterversion_canary_promote") not in page
