"""Thresholds calibrated on dev and out-of-scope scores, and questions answered as serving would, per mode."""

import pytest

from llm.calibration import (
    PICK_NEVER,
    VERBATIM,
    calibrate,
    calibrate_on,
    confident_outcomes,
    confident_report,
    pick_bar,
    pick_min_prob,
    pick_outcomes,
    pick_report,
)
from llm.evaluation import answer_as_served, evaluate_served, invented_numbers
from llm.grounding import CURATED, DEFAULT_THRESHOLDS, FALLBACK, GROUNDED, TRAINED_FALLBACK, Thresholds
from llm.retrieval import Hit

RETURNS = "您好！星河商城支持7天无理由退货，运费10元由您承担。"
SHIPPING = "您好！订单满99元包邮，一般48小时内发货。"


def _hits(*scored):
    return tuple(Hit(pair_id=n, rank=n, score=score, fused=0.0, question=f"问题{n}", answer=answer) for n, (score, answer) in enumerate(scored, 1))


def test_the_curated_threshold_is_the_lowest_score_with_no_wrong_top_pair_above_it():
    dev = [(0.97, True), (0.95, True), (0.91, False), (0.93, True), (0.89, True)]
    result = calibrate(dev, [0.5, 0.6])
    assert result.thresholds.curated == 0.93  # 0.91 was wrong: everything from 0.93 up is right
    assert result.report["curated_precision"] == 1.0 and result.report["dev_curated_share"] == 3 / 5


def test_with_the_best_scoring_dev_question_wrong_only_questions_asked_word_for_word_are_curated():
    assert calibrate([(0.99, False), (0.9, True)], []).thresholds.curated == VERBATIM == 0.999


def test_without_dev_pairs_the_defaults_stay():
    assert calibrate([], [0.7, 0.8]).thresholds == DEFAULT_THRESHOLDS


def test_the_fallback_threshold_keeps_ninety_five_percent_of_dev_above_it_and_screens_out_the_most_out_of_scope():
    dev = [(0.95, True)] * 18 + [(0.90, True), (0.85, False), (0.70, True)]  # 21: one may be lost
    oos = [0.50, 0.60, 0.80, 0.84, 0.86]
    result = calibrate(dev, oos)
    # the lowest dev score kept is 0.85; midway to the next lower score of either set (the oos 0.84)
    assert result.thresholds.fallback == pytest.approx(0.845)
    assert result.report["dev_fallback_share"] == 1 / 21 and result.report["out_of_scope_fallback_share"] == 4 / 5


def test_the_fallback_threshold_never_exceeds_the_curated_one():
    capped = calibrate([(0.6, False), (0.9, False)], [0.1])
    assert capped.thresholds.curated == VERBATIM and capped.thresholds.fallback == pytest.approx(0.35)
    over = calibrate([(0.6, True), (0.7, True)], [])
    assert over.thresholds.fallback <= over.thresholds.curated


THRESHOLDS = Thresholds(curated=0.9, fallback=0.6)


def _never(prompt):
    raise AssertionError("no model call expected")


def test_a_confident_match_is_the_curated_answer_and_a_poor_one_the_fallback_without_the_model():
    curated = answer_as_served("能退货吗", _hits((0.95, RETURNS), (0.7, SHIPPING)), THRESHOLDS, can_ground=True, generate=_never)
    assert (curated.mode, curated.text) == (CURATED, RETURNS)
    fallback = answer_as_served("卖汽车吗", _hits((0.4, RETURNS)), THRESHOLDS, can_ground=True, generate=_never)
    assert fallback.mode == FALLBACK
    # between the thresholds with no version to answer (the base model): the fallback
    unserved = answer_as_served("退货运费", _hits((0.8, RETURNS)), THRESHOLDS, can_ground=False, generate=_never)
    assert unserved.mode == FALLBACK


def test_a_grounded_answer_is_generated_from_the_references_and_the_trained_no_answer_is_the_fallback():
    prompts = []
    hits = _hits((0.8, RETURNS), (0.7, SHIPPING))
    grounded = answer_as_served("退货运费谁出", hits, THRESHOLDS, can_ground=True, generate=lambda p: prompts.append(p) or "运费10元由您承担。")
    assert (grounded.mode, grounded.text) == (GROUNDED, "运费10元由您承担。")
    assert prompts[0].startswith("<references>") and RETURNS in prompts[0] and prompts[0].endswith("Question: 退货运费谁出")
    unsure = answer_as_served("退货运费谁出", hits, THRESHOLDS, can_ground=True, generate=lambda p: TRAINED_FALLBACK)
    assert unsure.mode == FALLBACK and not unsure.guarded


def test_a_generated_answer_with_an_unsupported_number_is_replaced():
    assert THRESHOLDS.correction == pytest.approx(0.75)
    unsure = _hits((0.7, RETURNS), (0.65, SHIPPING))
    stopped = answer_as_served("退货运费谁出", unsure, THRESHOLDS, can_ground=True, generate=lambda p: "运费30元由您承担。")
    assert stopped.mode == FALLBACK and stopped.guarded  # 0.7: below the correction bar
    confident = _hits((0.8, RETURNS))
    corrected = answer_as_served("退货运费谁出", confident, THRESHOLDS, can_ground=True, generate=lambda p: "运费30元由您承担。")
    assert (corrected.mode, corrected.text, corrected.guarded) == (CURATED, RETURNS, True)


def test_a_picking_adapter_is_asked_first_and_its_sure_pick_is_the_curated_answer():
    hits = _hits((0.8, RETURNS), (0.78, SHIPPING))
    asked = []

    def choose(prompt, labels):
        asked.append((prompt, labels))
        return [0.05, 0.15, 0.8]  # [2]: the shipping pair

    picked = answer_as_served("多少钱包邮", hits, THRESHOLDS, can_ground=True, generate=_never, choose=choose)
    assert (picked.mode, picked.text, picked.hits[0].pair_id) == (CURATED, SHIPPING, 2)
    assert asked[0][0].startswith("<candidates>\n[1] 问题1\n[2] 问题2\n") and asked[0][1] == ["0", "1", "2"]
    # a sure "none": the fallback; unsure: the answer is generated as without a pick
    none = answer_as_served("多少钱包邮", hits, THRESHOLDS, can_ground=True, generate=_never, choose=lambda p, l: [0.9, 0.05, 0.05])
    assert none.mode == FALLBACK
    unsure = answer_as_served(
        "多少钱包邮", hits, THRESHOLDS, can_ground=True, generate=lambda p: "满99元包邮。", choose=lambda p, l: [0.4, 0.3, 0.3]
    )
    assert (unsure.mode, unsure.text) == (GROUNDED, "满99元包邮。")


def test_invented_numbers_are_numbers_no_source_states_list_markers_aside():
    assert invented_numbers("满199元包邮，1. 下单", [SHIPPING]) == ["199"]
    assert invented_numbers("满99元包邮，48小时内发货", [SHIPPING]) == []


def test_the_served_report_gives_each_modes_share_recall_and_invented_numbers():
    hits = _hits((0.8, RETURNS))
    answers = [
        answer_as_served("能退吗", _hits((0.95, RETURNS)), THRESHOLDS, can_ground=True, generate=_never),
        answer_as_served("退货运费", hits, THRESHOLDS, can_ground=True, generate=lambda p: "7天内可退，运费10元。"),
        answer_as_served("卖车吗", _hits((0.3, SHIPPING)), THRESHOLDS, can_ground=True, generate=_never),
    ]
    report = evaluate_served(answers, [RETURNS, RETURNS, SHIPPING])
    assert [report["modes"][m]["count"] for m in (CURATED, GROUNDED, FALLBACK)] == [1, 1, 1]
    assert report["modes"][CURATED]["key_fact_recall"] == 1.0 and report["modes"][FALLBACK]["key_fact_recall"] == 0.0
    assert report["invented_number_share"] == 0.0 and report["count"] == 3 and "exact_match" in report

    # Out of scope: no reference; a made-up number counts as invented
    made_up = answer_as_served("卖车吗", _hits((0.7, SHIPPING)), THRESHOLDS, can_ground=True, generate=lambda p: "满99元包邮。")
    oos = evaluate_served([made_up])
    assert oos["modes"][GROUNDED]["count"] == 1 and oos["invented_number_share"] == 0.0  # 99 is in the retrieved answer
    assert oos["modes"][GROUNDED]["key_fact_recall"] is None


def test_the_pick_bar_is_the_lowest_probability_with_ninety_nine_percent_of_picks_right_above_it():
    outcomes = [(0.95, True), (0.9, True), (0.8, False), (0.85, True), (0.6, True)]
    assert pick_bar(outcomes) == 0.85
    assert pick_bar([(0.9, False), (0.5, True)]) is None  # the surest pick was wrong: no bar holds
    assert pick_bar([]) is None
    report = pick_report(outcomes)
    assert report == {"pick_min_prob": 0.85, "pick_count": 5, "pick_right": 4, "pick_decided_share": 0.6}


def test_a_version_without_a_bar_decides_nothing_by_its_picks_and_a_setting_overrides_it():
    assert pick_min_prob({"pick_min_prob": None}) == PICK_NEVER > 1.0
    assert pick_min_prob({"pick_min_prob": 0.7}) == 0.7
    assert pick_min_prob({}) == 0.5 and pick_min_prob(None) == 0.5  # calibrated before picks were
    assert pick_min_prob({"pick_min_prob": None}, configured=0.6) == 0.6


class _Index:
    """Hits per question, as a retriever would give them."""

    def __init__(self, hits):
        self.hits = hits

    def search(self, question, k):
        return self.hits[question][:k]


def test_picks_are_asked_between_the_thresholds_and_scored_against_the_reference():
    limits = Thresholds(curated=0.95, fallback=0.8)
    index = _Index({
        "能退吗": _hits((0.9, SHIPPING), (0.85, RETURNS)),  # between: asked; the reference is second
        "运费多少": _hits((0.9, SHIPPING), (0.85, RETURNS)),  # between: asked
        "一字不差": _hits((0.99, RETURNS)),  # curated by score: never asked
        "卖车吗": _hits((0.88, SHIPPING)),  # out of scope, between: asked
    })
    named = {"能退吗": [0.1, 0.2, 0.7], "运费多少": [0.1, 0.8, 0.1], "卖车吗": [0.9, 0.1]}
    asked = []

    def choose(prompt, labels):
        question = next(q for q in named if q in prompt)
        asked.append(question)
        return named[question]

    outcomes = pick_outcomes(index, [("能退吗", RETURNS), ("运费多少", SHIPPING), ("一字不差", RETURNS)], ["卖车吗"], limits, choose, k=3)
    assert asked == ["能退吗", "运费多少", "卖车吗"]
    assert outcomes == [(0.7, True), (0.8, True), (0.9, True)]
    wrong = pick_outcomes(index, [("能退吗", SHIPPING)], [], limits, choose, k=3)  # named [2], the reference is [1]
    assert wrong == [(0.7, False)]


def _hit(score, answer, lead):
    return Hit(pair_id=1, rank=1, score=score, fused=0.0, question="问题", answer=answer, lead=lead)


def test_the_confidence_bar_is_fitted_on_the_questions_between_the_thresholds_out_of_scope_ones_counted_wrong():
    limits = Thresholds(curated=0.95, fallback=0.8)
    questions = [
        (_hit(0.99, RETURNS, 0.0), True),  # curated by its score: not between
        (_hit(0.7, RETURNS, 0.2), True),  # below the fallback threshold: not between
        (_hit(0.9, RETURNS, 0.05), True),  # confidence 1.0
        (_hit(0.9, RETURNS, 0.04), False),  # 0.98: a wrong top pair
        (_hit(0.85, RETURNS, 0.07), True),  # 0.99
        (_hit(0.88, SHIPPING, 0.0), False),  # 0.88, out of scope
        (None, False),  # nothing retrieved
    ]
    outcomes = confident_outcomes(questions, limits)
    assert outcomes == [(pytest.approx(1.0), True), (pytest.approx(0.98), False), (pytest.approx(0.99), True), (0.88, False)]
    assert confident_report(outcomes) == {
        "confident_threshold": pytest.approx(0.99), "confident_count": 4, "confident_right": 2,
        "confident_curated": 2, "confident_precision": 1.0,
    }
    # the surest was wrong: no bar
    assert confident_report([(1.2, False), (1.0, True)])["confident_threshold"] is None


def test_calibrating_on_an_index_gives_the_confidence_bar_with_the_thresholds():
    # the best-scoring paraphrase finds the wrong pair (so no score is curated but a verbatim one),
    # but leads nothing; the right ones lead their next pair the more, the closer they are
    hits = {"退0": (_hit(0.99, SHIPPING, 0.0),)} | {f"退{n}": (_hit(0.99 - n * 0.01, RETURNS, 0.05 - n * 0.004),) for n in range(1, 12)}
    index = _Index(hits | {"卖车吗": (_hit(0.9, SHIPPING, 0.001),), "二手吗": (_hit(0.5, SHIPPING, 0.0),)})
    result = calibrate_on(index, [(f"退{n}", RETURNS) for n in range(12)], ["卖车吗", "二手吗"])
    limits = result.thresholds
    assert limits.curated == VERBATIM and limits.fallback < 0.88
    # confidence 1.09 - 0.018 n: n = 1..5 right from 1.072 down to 1.0, then the wrong 0.99 (n = 0)
    assert limits.confident == pytest.approx(1.0) and limits.confident == result.report["confident_threshold"]
    assert result.report["confident_count"] == 13 and result.report["confident_right"] == 11  # the 0.902 out of scope too
    assert result.report["confident_curated"] == 5 and result.report["confident_precision"] == 1.0
