"""Per-version analytics of the chat: what each adapter version did, per day and in total.

    report(since=date(2026, 11, 1), until=date(2026, 11, 29))
      -> {"since", "until", "versions": [row...], "days": [row...], "top_questions": [group...]}

A row counts the answers one adapter version gave ("" = the base model) in the period (or on one
day): conversations it answered in, answers, 👍 and 👎 and the 👍 rate among rated answers, the
handoff rate (its conversations in which the customer asked for a person), median and p95
response time and first-token time, and tokens per second (generated tokens over generation
time), and "did you mean": the fallback replies that offered close curated questions
(chat.grounding.suggestions) and, of those, the ones the customer took (their next message in the
conversation is one of the offered questions, as a click sends it). Percentiles are nearest-rank.
Counting happens in Python over the period's answers (and, for "did you mean", the customer
messages of the conversations that were offered questions), so it is the same on SQLite and
PostgreSQL; the period defaults to the last 30 days.

Top questions: the customer questions whose answers were rated 👎, cut short (error, timeout)
or that were followed by a request for a person, grouped when their normalised text is similar
(character-bigram Jaccard ≥ SIMILAR), biggest groups first.
"""

import datetime
import math
from collections import defaultdict

from django.db.models import F, Q
from django.db.models.functions import TruncDate
from django.utils import timezone

from chat.grounding import suggestions
from chat.handoff import asks_for_a_person
from chat.models import Conversation, Message
from knowledge.models import normalise_question
from training.models import AdapterVersion

DEFAULT_DAYS = 30
SIMILAR = 0.5
TOP_GROUPS = 10


def percentile(values, fraction):
    """Nearest-rank percentile of a list of numbers; None for an empty list."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _summary(answers):
    """One row's numbers from a list of answer dicts (see _answers)."""
    up = sum(1 for a in answers if a["rating"] == 1)
    down = sum(1 for a in answers if a["rating"] == -1)
    conversations = {a["conversation_id"] for a in answers}
    handed_off = {a["conversation_id"] for a in answers if a["handoff"]}
    latencies = [a["latency_ms"] for a in answers if a["latency_ms"] is not None]
    first_tokens = [a["first_token_ms"] for a in answers if a["first_token_ms"] is not None]
    timed = [a for a in answers if a["latency_ms"] and a["tokens"]]
    seconds = sum(a["latency_ms"] for a in timed) / 1000
    return {
        "conversations": len(conversations),
        "answers": len(answers),
        "thumbs_up": up,
        "thumbs_down": down,
        "thumbs_up_rate": round(up / (up + down), 4) if up + down else None,
        "handoff_rate": round(len(handed_off) / len(conversations), 4) if conversations else None,
        "latency_ms_median": percentile(latencies, 0.5),
        "latency_ms_p95": percentile(latencies, 0.95),
        "first_token_ms_median": percentile(first_tokens, 0.5),
        "first_token_ms_p95": percentile(first_tokens, 0.95),
        "tokens_per_second": round(sum(a["tokens"] for a in timed) / seconds, 2) if seconds else None,
        "suggestions_offered": sum(1 for a in answers if a.get("offered")),
        "suggestions_taken": sum(1 for a in answers if a.get("taken")),
    }


def _mark_suggestions(answers):
    """Mark each answer dict that offered "did you mean" questions (`offered`: the questions, as the
    customer saw them) and whether the customer's next message in its conversation was one of them
    (`taken`). Compared normalised: a click sends the question word for word; typed again counts too."""
    offering = []
    for answer in answers:
        offered = suggestions(answer.get("sources"), answer.get("mode"))
        answer["offered"] = [normalise_question(item["question"], "") for item in offered]
        answer["taken"] = False
        if offered:
            offering.append(answer)
    if not offering:
        return answers
    asked = defaultdict(list)  # conversation -> its customer messages, oldest first
    customer = Message.objects.filter(conversation_id__in={a["conversation_id"] for a in offering}, role=Message.Role.USER)
    for row in customer.order_by("created_at", "id").values("conversation_id", "created_at", "id", "text"):
        asked[row["conversation_id"]].append(row)
    for answer in offering:
        after = (answer["created_at"], answer["id"])
        following = next((m for m in asked[answer["conversation_id"]] if (m["created_at"], m["id"]) > after), None)
        answer["taken"] = following is not None and normalise_question(following["text"], "") in answer["offered"]
    return answers


def _answers(since, until, version=None):
    answers = (
        Message.objects.filter(role=Message.Role.ASSISTANT, created_at__date__gte=since, created_at__date__lte=until)
        .exclude(finish_reason="")  # still streaming
        .annotate(day=TruncDate("created_at"), handoff_at=F("conversation__handoff_requested_at"))
    )
    if version is not None:
        answers = answers.filter(adapter_name=version)
    rows = answers.values(
        "id", "conversation_id", "adapter_name", "day", "created_at", "latency_ms", "first_token_ms", "tokens", "rating",
        "finish_reason", "handoff_at", "mode", "sources",
    )
    return _mark_suggestions([{**row, "handoff": row["handoff_at"] is not None} for row in rows])


def period(since=None, until=None):
    until = until or timezone.localdate()
    if since is None:
        try:
            since = until - datetime.timedelta(days=DEFAULT_DAYS - 1)
        except OverflowError:  # until in the first days of year 1
            since = datetime.date.min
    if since > until:
        raise ValueError("since is after until")
    return since, until


def report(*, since=None, until=None, version=None):
    since, until = period(since, until)
    answers = _answers(since, until, version)
    by_version, by_day = defaultdict(list), defaultdict(list)
    for answer in answers:
        by_version[answer["adapter_name"]].append(answer)
        by_day[(answer["day"], answer["adapter_name"])].append(answer)
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "versions": [{"version": name, **_summary(rows)} for name, rows in sorted(by_version.items())],
        "days": [
            {"day": day.isoformat(), "version": name, **_summary(rows)} for (day, name), rows in sorted(by_day.items())
        ],
        "top_questions": top_questions(since, until, version),
    }


def _bigrams(text):
    return {text[i : i + 2] for i in range(len(text) - 1)} or {text}


def similarity(a, b):
    """Jaccard similarity of two normalised texts' character bigrams (works for Chinese and English)."""
    x, y = _bigrams(a), _bigrams(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def top_questions(since, until, version=None, *, limit=TOP_GROUPS):
    """Questions the assistant did not answer well, grouped by similar text, biggest groups first."""
    problems = Message.objects.filter(
        Q(rating=-1) | Q(finish_reason__in=("error", "timeout")),
        role=Message.Role.ASSISTANT, created_at__date__gte=since, created_at__date__lte=until,
    )
    if version is not None:
        problems = problems.filter(adapter_name=version)
    texts = [
        (text, "disliked" if rating == -1 else "cut_short")
        for text, rating in problems.annotate(question=Message.question_text()).values_list("question", "rating")
        if text
    ]
    # A handoff: the customer's last question before asking for a person is what the assistant
    # did not answer (the request itself, "转人工", is not a question).
    if version is None:
        asked = Conversation.objects.filter(handoff_requested_at__date__gte=since, handoff_requested_at__date__lte=until)
        for conversation in asked.only("id", "handoff_requested_at"):
            before = Message.objects.filter(
                conversation=conversation, role=Message.Role.USER, created_at__lte=conversation.handoff_requested_at
            ).order_by("-created_at", "-id").values_list("text", flat=True)
            last = next((text for text in before[:10] if not asks_for_a_person(text)), None)
            if last:
                texts.append((last, "handoff"))
    groups = []  # [{"question": first text, "key": normalised, "count", "reasons": {...}, "examples": [...]}]
    for text, reason in texts:
        key = normalise_question(text, "")
        for group in groups:
            if similarity(key, group["key"]) >= SIMILAR:
                break
        else:
            group = {"question": text, "key": key, "count": 0, "reasons": defaultdict(int), "examples": []}
            groups.append(group)
        group["count"] += 1
        group["reasons"][reason] += 1
        if text not in group["examples"] and len(group["examples"]) < 5:
            group["examples"].append(text)
    groups.sort(key=lambda g: (-g["count"], g["question"]))
    return [
        {"question": g["question"], "count": g["count"], "reasons": dict(g["reasons"]), "examples": g["examples"]}
        for g in groups[:limit]
    ]


# Finish reasons of answers generated and then replaced: by the curated answer when the fact guard
# found a number the retrieved pairs do not state (corrected), or by the fallback reply (the guard
# with no curated answer close enough, or the adapter's trained no-answer sentence: stored alike).
REPLACED = (Message.FinishReason.CORRECTED, Message.FinishReason.FALLBACK)


def rollout_report():
    """The latest canary rollout (training.canary), its two sides side by side, or None when there
    never was one: {"canary": name, "running", "percent", "since", "sides": [row...]}.

    A side counts the conversations started on it since the canary started (chat.canary records
    each one's side) and their answers: the figures of a version row, plus the fallback share
    (answers given the fallback reply) and the guard share (answers generated and then replaced,
    REPLACED). Each side lists the versions that answered it (the active side's conversations keep
    the version that was active when they started, after a promote too).
    """
    canary = AdapterVersion.objects.filter(canary_started_at__isnull=False).order_by("-canary_started_at").first()
    if canary is None:
        return None
    rows = (
        Message.objects.filter(
            role=Message.Role.ASSISTANT, conversation__created_at__gte=canary.canary_started_at,
            conversation__rollout__in=(Conversation.Rollout.ACTIVE, Conversation.Rollout.CANARY),
        )
        .exclude(finish_reason="")
        .annotate(handoff_at=F("conversation__handoff_requested_at"), side=F("conversation__rollout"))
        .values(
            "id", "conversation_id", "adapter_name", "created_at", "latency_ms", "first_token_ms", "tokens", "rating",
            "finish_reason", "mode", "sources", "handoff_at", "side",
        )
    )
    by_side = defaultdict(list)
    for row in _mark_suggestions([{**row, "handoff": row["handoff_at"] is not None} for row in rows]):
        by_side[row["side"]].append(row)
    sides = []
    for side in (Conversation.Rollout.ACTIVE, Conversation.Rollout.CANARY):
        answers = by_side[side]
        count = len(answers)
        sides.append({
            "side": side,
            "versions": sorted({a["adapter_name"] for a in answers}),
            **_summary(answers),
            "fallback_share": round(sum(a["mode"] == Message.Mode.FALLBACK for a in answers) / count, 4) if count else None,
            "guard_share": round(sum(a["finish_reason"] in REPLACED for a in answers) / count, 4) if count else None,
        })
    return {
        "canary": canary.name,
        "running": canary.is_canary,
        "percent": canary.canary_percent,
        "since": canary.canary_started_at.isoformat(),
        "sides": sides,
    }
