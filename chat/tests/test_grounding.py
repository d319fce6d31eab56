"""chat.grounding without an engine: the guarded stream fed the events an engine sends, the canned
answers, the thresholds' sources."""

import dataclasses

import pytest

from chat import grounding
from llm import grounding as modes
from llm.engine import Done, Stats, Token
from llm.retrieval import Hit

ANSWER = "您好！星河商城支持7天无理由退货，自签收次日起7天内均可申请。"


def hit(pair_id, score, answer=ANSWER, rank=1):
    return Hit(pair_id=pair_id, rank=rank, score=score, fused=0.0, question=f"问题{pair_id}", answer=answer)


def plan(score=0.9, *, references=True, hits=None):
    limits = modes.Thresholds(curated=0.95, fallback=0.8)
    hits = hits or (hit(1, score), hit(2, 0.7, answer="运费由您承担，最高赔付12元。", rank=2))
    decision = modes.decide(hits, limits)
    return grounding.Plan(
        decision=decision, version=None, references_in_prompt=references, question="可以退货吗？",
        customer_texts=("可以退货吗？",), fallback_text="FALLBACK", thresholds=limits,
    )


class Request:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def run(stream, pieces, reason="stop"):
    events = []
    guarded = grounding.GuardedStream(stream, on_event=events.append)
    request = Request()
    guarded.attach(request)
    for piece in pieces:
        guarded(Token(piece))
    guarded(Done(Stats(request_id="r", adapter="v1", finish_reason=reason)))
    return guarded, events, request


def test_a_supported_answer_passes_through_unchanged_whatever_its_pieces():
    for size in (1, 2, 5, 100):
        pieces = [ANSWER[i : i + size] for i in range(0, len(ANSWER), size)]
        guarded, events, request = run(plan(), pieces)
        assert "".join(e.text for e in events if isinstance(e, Token)) == ANSWER
        assert events[-1].stats.finish_reason == "stop" and guarded.mode == "grounded" and not request.cancelled


def test_an_unsupported_number_is_never_shown_and_the_confident_best_pair_replaces_the_answer():
    wrong = "您好！星河商城支持30天无理由退货。"
    guarded, events, request = run(plan(score=0.9), list(wrong))
    shown = "".join(e.text for e in events if isinstance(e, Token))
    assert "30" not in shown and shown == "您好！星河商城支持"
    assert isinstance(events[-2], grounding.Replace) and events[-2].text == ANSWER
    assert events[-1].stats.finish_reason == "corrected" and guarded.mode == "curated" and request.cancelled
    assert guarded.text == ANSWER


def test_below_the_correction_bar_the_fallback_replaces_it():
    guarded, events, _ = run(plan(score=0.85), ["30天内可以退货。"])  # correction bar: 0.875
    assert [e.text for e in events if isinstance(e, Token)] == ["FALLBACK"]  # nothing shown before: no replace
    assert events[-1].stats.finish_reason == "fallback" and guarded.mode == "fallback"


def test_numbers_from_the_customer_and_from_a_lower_ranked_pair_are_supported():
    text = "可以的，运费最高赔付12元。"
    guarded, events, _ = run(plan(), list(text))
    assert guarded.text == text and events[-1].stats.finish_reason == "stop"


def test_the_trained_no_answer_sentence_becomes_the_configured_fallback_reply():
    said = modes.TRAINED_FALLBACK
    guarded, events, request = run(plan(), [said[:3], said[3:], "……"])
    assert [e.text for e in events if isinstance(e, Token)] == ["FALLBACK"] and guarded.mode == "fallback"
    assert events[-1].stats.finish_reason == "fallback" and request.cancelled


def test_an_answer_that_only_begins_like_the_sentence_is_shown_whole():
    start = modes.TRAINED_FALLBACK[:2]
    guarded, events, _ = run(plan(), [start, "没关系，7天内可以退。"])
    assert guarded.text == start + "没关系，7天内可以退。" and guarded.mode == "grounded"


def test_a_version_trained_without_references_is_not_watched_for_the_sentence():
    said = modes.TRAINED_FALLBACK
    guarded, _, _ = run(plan(references=False), [said])
    assert guarded.text == said and guarded.mode == "grounded"


def test_canned_answers_stream_in_pieces_and_end_at_once():
    events = []
    request = grounding.CannedRequest(ANSWER + "\n1. 进入“我的订单”", adapter=None, on_event=events.append, submitted=0.0)
    request.start()
    assert "".join(e.text for e in events[:-1]) == request.text and len(events) > 3
    assert events[-1].stats.finish_reason == "stop" and events[-1].stats.tokens == len(events) - 1


@pytest.mark.django_db
def test_thresholds_come_from_settings_then_the_versions_calibration_then_the_default(settings):
    class Version:
        curated_threshold, fallback_threshold, path = 0.97, 0.9, "/nonexistent"

    settings.CSP_CURATED_THRESHOLD = settings.CSP_FALLBACK_THRESHOLD = None
    assert grounding.thresholds(None) == modes.DEFAULT_THRESHOLDS
    assert grounding.thresholds(Version()) == modes.Thresholds(curated=0.97, fallback=0.9)
    settings.CSP_CURATED_THRESHOLD = 0.85  # below the calibrated fallback: the fallback follows it down
    assert grounding.thresholds(Version()) == modes.Thresholds(curated=0.85, fallback=0.85)


@pytest.mark.django_db
def test_the_confidence_bar_comes_from_the_setting_then_the_versions_calibration_then_the_default(settings):
    class Version:
        curated_threshold, fallback_threshold, path = 0.97, 0.9, "/nonexistent"
        calibration = {"confident_threshold": 1.02}

    class Older(Version):
        calibration = {"curated_threshold": 0.97}  # calibrated before the bar: none

    settings.CSP_CURATED_THRESHOLD = settings.CSP_FALLBACK_THRESHOLD = settings.CSP_CONFIDENT_THRESHOLD = None
    assert grounding.thresholds(Version()).confident == 1.02
    assert grounding.thresholds(Older()).confident is None
    assert grounding.thresholds(None).confident == modes.DEFAULT_THRESHOLDS.confident is not None
    settings.CSP_CONFIDENT_THRESHOLD = 1.1
    assert grounding.thresholds(Version()).confident == grounding.thresholds(None).confident == 1.1
    settings.CSP_CONFIDENT_THRESHOLD = "off"
    assert grounding.thresholds(Version()).confident is None and grounding.thresholds(None).confident is None


@pytest.mark.django_db
def test_when_retrieval_fails_the_customer_gets_the_fallback_and_the_log_says_why(settings, monkeypatch, caplog):
    settings.CSP_GROUNDING = True

    def broken():
        raise RuntimeError("embedding model missing")

    monkeypatch.setattr(grounding, "serving_index", broken)
    planned = grounding.plan_answer(text="可以退货吗？")
    assert planned.mode == "fallback" and not planned.needs_engine and planned.reply() == grounding.fallback_reply()
    assert "retrieval failed" in caplog.text and "embedding model missing" in caplog.text


def test_the_socket_speaks_the_pages_language(settings):
    from chat.consumers import scope_language

    assert scope_language({"cookies": {settings.LANGUAGE_COOKIE_NAME: "en"}, "headers": [(b"accept-language", b"zh-CN")]}) == "en"
    assert scope_language({"cookies": {}, "headers": [(b"accept-language", b"fr-FR,en-US;q=0.8,en;q=0.5")]}) == "en"
    assert scope_language({"cookies": {}, "headers": [(b"accept-language", b"zh-CN,zh;q=0.9")]}) == "zh-hans"
    assert scope_language({"cookies": {settings.LANGUAGE_COOKIE_NAME: "xx"}, "headers": []}) == settings.LANGUAGE_CODE


def test_a_cancelled_answer_ends_as_it_stands_without_releasing_what_the_guard_holds():
    events = []
    guarded = grounding.GuardedStream(plan(), on_event=events.append)
    request = Request()
    guarded.attach(request)
    for piece in "您好！运费30":
        guarded(Token(piece))
    request.cancel()
    guarded(Done(Stats(request_id="r", adapter="v1", finish_reason="cancelled")))
    assert guarded.text == "您好！运费" and events[-1].stats.finish_reason == "cancelled" and guarded.mode == "grounded"


@pytest.mark.django_db
def test_a_malformed_conversation_id_gives_no_context_and_no_error():
    assert grounding.earlier_questions(conversation_id="not-a-uuid") == []
    assert grounding.earlier_questions(conversation_id=123) == []


def test_the_pick_is_asked_of_the_version_the_plan_was_made_for_unless_the_caller_pinned_one(settings):
    # The process's engine switches to a newly activated version up to ACTIVE_CHECK_SECONDS later:
    # the pick must not go to whichever version the engine serves at that moment.
    from types import SimpleNamespace

    settings.CSP_GROUNDING_K = 3
    version = SimpleNamespace(name="v7", path="/adapters/v7")
    picking = dataclasses.replace(plan(score=0.9), version=version, picks=True)
    engine = SimpleNamespace(supports_choices=True)
    _turns, options = grounding._pick_request(picking, engine, {})
    assert (options["adapter"], options["adapter_path"]) == ("v7", "/adapters/v7")
    _turns, options = grounding._pick_request(picking, engine, {"adapter": "v6", "adapter_path": "/adapters/v6"})
    assert (options["adapter"], options["adapter_path"]) == ("v6", "/adapters/v6")  # a canary's pin stays


def test_the_pick_bar_comes_from_the_setting_then_the_versions_calibration_then_the_default(settings):
    from types import SimpleNamespace

    settings.CSP_RERANK_MIN_PROB = None
    assert grounding.pick_min_prob(None) == modes.DEFAULT_CHOICE_MIN  # no version yet
    assert grounding.pick_min_prob(SimpleNamespace(calibration={})) == modes.DEFAULT_CHOICE_MIN  # calibrated before picks were
    assert grounding.pick_min_prob(SimpleNamespace(calibration={"pick_min_prob": 0.8})) == 0.8
    never = SimpleNamespace(calibration={"pick_min_prob": None})  # no bar held on its calibration set
    assert grounding.pick_min_prob(never) > 1.0
    settings.CSP_RERANK_MIN_PROB = 0.6
    assert grounding.pick_min_prob(never) == 0.6


def test_a_sure_pick_decides_only_at_the_versions_bar(settings):
    from types import SimpleNamespace

    settings.CSP_RERANK_MIN_PROB = None
    asked = dataclasses.replace(plan(score=0.9), version=SimpleNamespace(calibration={"pick_min_prob": 0.8}), picks=True)
    assert grounding._picked(asked, [0.05, 0.75, 0.2]).mode == modes.GROUNDED  # 0.75 < 0.8: generated
    assert grounding._picked(asked, [0.05, 0.85, 0.1]).mode == modes.CURATED
