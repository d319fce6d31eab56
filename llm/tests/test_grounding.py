"""The mode decision and the adapter's pick among the retrieved pairs (llm.grounding): pure logic."""

import pytest

from llm.grounding import (
    CURATED,
    FALLBACK,
    GROUNDED,
    NONE,
    Thresholds,
    choice_labels,
    confidence,
    choose,
    decide,
    selection_question,
)
from llm.retrieval import Hit

LIMITS = Thresholds(curated=0.94, fallback=0.90)


def _hits(*scores):
    return [
        Hit(pair_id=10 + n, rank=n, score=score, fused=score, question=f"用户问：问题{n}？", answer=f"答案{n}")
        for n, score in enumerate(scores, 1)
    ]


def test_scores_pick_the_mode_and_no_version_means_no_grounded_answer():
    assert decide(_hits(0.97, 0.9), LIMITS).mode == CURATED
    assert decide(_hits(0.92, 0.9), LIMITS).mode == GROUNDED
    assert decide(_hits(0.92, 0.9), LIMITS, can_ground=False).mode == FALLBACK
    assert decide(_hits(0.85), LIMITS).mode == FALLBACK
    assert decide([], LIMITS).mode == FALLBACK


def test_a_match_between_the_thresholds_that_leads_the_next_pair_clearly_is_curated_even_without_a_version():
    limits = Thresholds(curated=0.94, fallback=0.90, confident=1.0)
    clear = Hit(pair_id=1, rank=1, score=0.93, fused=0.0, question="问题", answer="答案", lead=0.04)
    close = Hit(pair_id=1, rank=1, score=0.93, fused=0.0, question="问题", answer="答案", lead=0.01)
    assert confidence(clear) == pytest.approx(1.01) and confidence(close) == pytest.approx(0.95)
    decided = decide([clear], limits, can_ground=False)
    assert decided.mode == CURATED and "leads the next pair by 0.040" in decided.reason
    assert decide([close], limits).mode == GROUNDED and decide([close], limits, can_ground=False).mode == FALLBACK
    # below the fallback threshold no lead makes it curated; without a bar none does
    assert decide([Hit(1, 1, 0.85, 0.0, "问题", "答案", lead=0.3)], limits).mode == FALLBACK
    assert decide([clear], Thresholds(curated=0.94, fallback=0.90)).mode == GROUNDED
    with pytest.raises(ValueError):
        Thresholds(curated=0.94, fallback=0.9, confident=3.5)


def test_the_pick_question_lists_the_candidates_as_customers_ask_them():
    text = selection_question(" 钱多久到账？ ", _hits(0.92, 0.91, 0.9))
    assert text == "<candidates>\n[1] 问题1？\n[2] 问题2？\n[3] 问题3？\n</candidates>\nQuestion: 钱多久到账？\nSame as:"
    assert choice_labels(3) == [NONE, "1", "2", "3"]
    with pytest.raises(ValueError):
        selection_question("?", _hits(*[0.9] * 10))


def test_a_sure_pick_answers_curated_with_that_pair_first_and_its_rank_kept():
    grounded = decide(_hits(0.92, 0.91, 0.9), LIMITS)
    picked = choose(grounded, [0.1, 0.1, 0.2, 0.6])
    assert picked.mode == CURATED and picked.best.pair_id == 13 and picked.best.rank == 3
    assert [hit.pair_id for hit in picked.hits] == [13, 11, 12] and "picked [3]" in picked.reason


def test_a_sure_none_falls_back_and_an_unsure_answer_stays_grounded():
    grounded = decide(_hits(0.92, 0.91, 0.9), LIMITS)
    assert choose(grounded, [0.7, 0.1, 0.1, 0.1]).mode == FALLBACK
    unsure = choose(grounded, [0.3, 0.3, 0.2, 0.2])
    assert unsure.mode == GROUNDED and unsure.hits == grounded.hits
    assert choose(grounded, [0.3, 0.3, 0.2, 0.2], min_prob=0.3).mode == FALLBACK  # the bar is a setting
    # Only a grounded decision is put to the adapter.
    curated = decide(_hits(0.97), LIMITS)
    assert choose(curated, [0.9, 0.1]) is curated
