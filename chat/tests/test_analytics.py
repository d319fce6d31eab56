"""Per-version analytics equal a hand count of a fixed set of conversations."""

import datetime

import pytest
from django.urls import reverse
from django.utils import timezone

from chat import analytics
from chat.models import Conversation, Message
from training.charts import series_chart_svg

pytestmark = [pytest.mark.django_db, pytest.mark.services]

DAY1 = datetime.date(2026, 11, 2)
DAY2 = datetime.date(2026, 11, 3)


def _at(day, hour):
    return timezone.make_aware(datetime.datetime.combine(day, datetime.time(hour)))


def _exchange(conversation, question, version, *, latency, first, tokens, rating=None, reason="stop", when):
    ask = Message.objects.create(conversation=conversation, role="user", text=question)
    answer = Message.objects.create(
        conversation=conversation, role="assistant", text="答", adapter_name=version, latency_ms=latency,
        first_token_ms=first, tokens=tokens, rating=rating, finish_reason=reason,
    )
    Message.objects.filter(pk__in=[ask.pk, answer.pk]).update(created_at=when)
    return answer


@pytest.fixture
def history():
    """Day 1: v1 answers 3 times in 2 conversations (one handed off); day 2: v1 once, v2 twice."""
    a = Conversation.objects.create(session_key="a")
    b = Conversation.objects.create(session_key="b", handoff_requested_at=_at(DAY1, 11))
    c = Conversation.objects.create(session_key="c")
    _exchange(a, "用户问：如何退货？", "v1", latency=1000, first=100, tokens=10, rating=1, when=_at(DAY1, 9))
    _exchange(a, "用户问：运费谁出？", "v1", latency=3000, first=300, tokens=20, rating=-1, when=_at(DAY1, 10))
    _exchange(b, "用户问：退货要多久？", "v1", latency=2000, first=200, tokens=30, when=_at(DAY1, 10))
    Message.objects.filter(conversation=b).update(created_at=_at(DAY1, 10))
    keyword = Message.objects.create(conversation=b, role="user", text="转人工")
    Message.objects.filter(pk=keyword.pk).update(created_at=_at(DAY1, 11))
    _exchange(a, "用户问：如何退货呢？", "v1", latency=4000, first=400, tokens=40, rating=-1, when=_at(DAY2, 9))
    _exchange(c, "用户问：几天发货？", "v2", latency=500, first=50, tokens=25, rating=1, when=_at(DAY2, 9))
    _exchange(c, "用户问：包邮吗？", "v2", latency=1500, first=150, tokens=5, reason="timeout", when=_at(DAY2, 10))
    Message.objects.create(conversation=c, role="assistant", text="", adapter_name="v2")  # still streaming: not counted
    return a, b, c


def test_version_totals_equal_a_hand_count(history):
    data = analytics.report(since=DAY1, until=DAY2)
    v1, v2 = data["versions"]
    assert v1 == {
        "version": "v1", "conversations": 2, "answers": 4, "thumbs_up": 1, "thumbs_down": 2,
        "thumbs_up_rate": round(1 / 3, 4), "handoff_rate": 0.5,
        "latency_ms_median": 2000, "latency_ms_p95": 4000,  # nearest rank of 1000, 2000, 3000, 4000
        "first_token_ms_median": 200, "first_token_ms_p95": 400,
        "tokens_per_second": round(100 / 10, 2),  # 100 tokens in 10 s
        "suggestions_offered": 0, "suggestions_taken": 0,
    }
    assert v2 == {
        "version": "v2", "conversations": 1, "answers": 2, "thumbs_up": 1, "thumbs_down": 0,
        "thumbs_up_rate": 1.0, "handoff_rate": 0.0,
        "latency_ms_median": 500, "latency_ms_p95": 1500,
        "first_token_ms_median": 50, "first_token_ms_p95": 150,
        "tokens_per_second": 15.0,  # 30 tokens in 2 s
        "suggestions_offered": 0, "suggestions_taken": 0,
    }


def test_did_you_mean_counts_the_offers_and_the_ones_taken(settings):
    """A fallback reply that offered close questions counts as offered; it was taken when the
    customer's next message is one of them (as a click sends it), not when they asked something
    else or nothing more. A fallback with nothing close offers nothing."""
    settings.CSP_CHAT_SUGGESTIONS = 3
    close = [
        {"pair": 1, "rank": 1, "score": 0.93, "question": "退款多久到账？", "suggest": True},
        {"pair": 2, "rank": 2, "score": 0.92, "question": "怎么申请退款？", "suggest": True},
    ]
    far = [{"pair": 3, "rank": 1, "score": 0.5, "question": "发票怎么开？", "suggest": False}]
    taken, ignored, last, unrelated = (Conversation.objects.create(session_key=key) for key in "wxyz")
    for conversation, sources in ((taken, close), (ignored, close), (last, close), (unrelated, far)):
        _exchange(conversation, "钱什么时候回来？", "v1", latency=100, first=10, tokens=0, when=_at(DAY1, 9))
        Message.objects.filter(conversation=conversation, role="assistant").update(mode="fallback", sources=sources)
    _exchange(taken, "怎么申请退款？", "v1", latency=100, first=10, tokens=0, when=_at(DAY1, 10))
    _exchange(ignored, "你们几点下班？", "v1", latency=100, first=10, tokens=0, when=_at(DAY1, 10))

    v1 = analytics.report(since=DAY1, until=DAY1)["versions"][0]

    assert (v1["answers"], v1["suggestions_offered"], v1["suggestions_taken"]) == (6, 3, 1)
    settings.CSP_CHAT_SUGGESTIONS = 0  # turned off: nothing is offered
    v1 = analytics.report(since=DAY1, until=DAY1)["versions"][0]
    assert (v1["suggestions_offered"], v1["suggestions_taken"]) == (0, 0)


def test_days_split_each_versions_numbers(history):
    days = {(row["day"], row["version"]): row for row in analytics.report(since=DAY1, until=DAY2)["days"]}
    assert sorted(days) == [("2026-11-02", "v1"), ("2026-11-03", "v1"), ("2026-11-03", "v2")]
    first = days[("2026-11-02", "v1")]
    assert (first["answers"], first["conversations"], first["handoff_rate"], first["latency_ms_median"]) == (3, 2, 0.5, 2000)
    assert days[("2026-11-03", "v1")]["thumbs_up_rate"] == 0.0
    only_day2 = analytics.report(since=DAY2, until=DAY2)
    assert [row["answers"] for row in only_day2["versions"]] == [1, 2]


def test_questions_answered_worst_are_grouped_by_similar_text(history):
    groups = analytics.report(since=DAY1, until=DAY2)["top_questions"]
    by_question = {group["question"]: group for group in groups}
    # 如何退货？ (👎 on day 2, as 如何退货呢？) and 运费谁出？ (👎), 包邮吗？ (timeout), 退货要多久？ (then 转人工)
    returns = next(g for g in groups if "如何退货" in g["question"])
    assert returns["count"] == 1 and returns["reasons"] == {"disliked": 1}
    assert by_question["用户问：运费谁出？"]["reasons"] == {"disliked": 1}
    assert by_question["用户问：包邮吗？"]["reasons"] == {"cut_short": 1}
    assert by_question["用户问：退货要多久？"]["reasons"] == {"handoff": 1}
    assert sum(g["count"] for g in groups) == 4
    assert analytics.similarity("如何退货", "如何退货呢") > analytics.SIMILAR > analytics.similarity("如何退货", "几天发货")


def test_the_json_endpoint_and_the_admin_page_show_the_same_numbers(history, staff_api, staff_client, customer_api):
    response = staff_api.get("/api/v1/analytics/", {"since": "2026-11-02", "until": "2026-11-03"})
    assert response.status_code == 200
    assert response.json()["versions"] == analytics.report(since=DAY1, until=DAY2)["versions"]
    bad_date = staff_api.get("/api/v1/analytics/", {"since": "2 Nov"})
    assert bad_date.status_code == 400 and list(bad_date.json()) == ["since"] and "YYYY-MM-DD" in bad_date.json()["since"][0]
    assert staff_api.get("/api/v1/analytics/", {"since": "2026-11-04", "until": "2026-11-03"}).status_code == 400
    assert staff_api.get("/api/v1/analytics/", {"until": "0001-01-01"}).json()["since"] == "0001-01-01"  # no overflow
    assert customer_api.get("/api/v1/analytics/").status_code == 403

    page = staff_client.get(reverse("admin-analytics"), {"since": "2026-11-02", "until": "2026-11-03"})
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="analytics-versions"' in html and "<svg" in html and "33.3%" in html  # v1's 👍 rate


def test_the_admin_page_needs_the_conversation_permission(client, django_user_model):
    user = django_user_model.objects.create_user("clerk", password="pw-123456789", is_staff=True)
    client.force_login(user)
    assert client.get(reverse("admin-analytics")).status_code == 403


def test_series_chart_draws_one_line_per_series_with_gaps():
    svg = series_chart_svg(["d1", "d2", "d3"], {"v1": [1, 2, 3], "v2": [None, 0.5, None]}, title="t")
    assert svg.count("<polyline") == 1 and svg.count("<circle") == 4 and ">v2<" in svg
    assert series_chart_svg([], {}) == ""
