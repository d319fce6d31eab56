"""Checks on data/calibration.json, the set a training run fits its answer-mode thresholds on, and
on what else the sample data holds beside the evaluation sets (alternates, follow-ups).

The thresholds must not be fitted on the sets we measure with (data/dev.json and
data/out_of_scope.json), so these tests hold the calibration set apart from them and
tie each paraphrase to a real train.json pair.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider training/tests/test_calibration_data.py
"""
import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "data"
PREFIX = "用户问："
NEAR_COPY_JACCARD = 0.75


def _load(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def normalise(text):
    """Strip, drop the 用户问： prefix, then remove whitespace and the punctuation ？?！!。，,、."""
    text = text.strip()
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    return re.sub(r"[\s？?！!。，,、]", "", text)


def bigrams(text):
    """The set of adjacent character pairs of a normalised question."""
    return {text[i:i + 2] for i in range(len(text) - 1)}


def jaccard(a, b):
    """Character-bigram Jaccard similarity of two normalised questions."""
    sa, sb = bigrams(a), bigrams(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def near_copies(texts, held_out):
    """The texts within NEAR_COPY_JACCARD of any held-out question."""
    held_out = [normalise(q) for q in held_out]
    return [text for text in texts if max(jaccard(normalise(text), question) for question in held_out) >= NEAR_COPY_JACCARD]


@pytest.fixture(scope="module")
def calibration():
    return _load("calibration.json")


@pytest.fixture(scope="module")
def calibration_questions(calibration):
    return [p["question"] for p in calibration["paraphrases"]] + list(calibration["out_of_scope"])


@pytest.fixture(scope="module")
def train():
    return _load("train.json")


def evaluation_questions():
    """The dev instructions and the out_of_scope.json questions, which calibration must not copy.

    Called inside the tests rather than used as a fixture: pytest prints a failing test's
    arguments, and a failure should show only the offending question, not the evaluation sets.
    """
    return [p["instruction"] for p in _load("dev.json")] + [q["question"] for q in _load("out_of_scope.json")]


def test_every_paraphrase_names_exactly_one_train_pair_and_they_cover_enough_pairs(calibration, train):
    instructions = [p["instruction"] for p in train]
    unknown = [p for p in calibration["paraphrases"] if instructions.count(p["pair"]) != 1]
    assert unknown == []
    assert len(calibration["paraphrases"]) >= 110
    assert len({p["pair"] for p in calibration["paraphrases"]}) >= 90


def test_paraphrases_cover_every_train_category(calibration, train):
    category_of = {p["instruction"]: p["category"] for p in train}
    asked = {category_of[p["pair"]] for p in calibration["paraphrases"]}
    assert asked == set(category_of.values())


def test_no_calibration_question_is_a_train_question_or_alternate(calibration_questions, train):
    indexed = {normalise(p["instruction"]) for p in train}
    indexed |= {normalise(a) for p in train for a in p.get("alternates", [])}
    copies = [q for q in calibration_questions if normalise(q) in indexed]
    assert copies == []


def test_no_calibration_question_equals_an_evaluation_question(calibration_questions):
    held_out = {normalise(q) for q in evaluation_questions()}
    copies = [q for q in calibration_questions if normalise(q) in held_out]
    assert copies == []


def test_no_calibration_question_is_a_near_copy_of_an_evaluation_question(calibration_questions):
    held_out = [normalise(q) for q in evaluation_questions()]
    near = [
        (q, e, round(jaccard(normalise(q), e), 2))
        for q in calibration_questions
        for e in held_out
        if jaccard(normalise(q), e) >= NEAR_COPY_JACCARD
    ]
    assert near == []


def test_the_calibration_file_has_no_duplicate_questions(calibration_questions):
    normalised = [normalise(q) for q in calibration_questions]
    assert len(normalised) == len(set(normalised))


def test_there_are_at_least_50_out_of_scope_questions(calibration):
    assert len(calibration["out_of_scope"]) >= 50
    assert all(isinstance(q, str) and q.strip() for q in calibration["out_of_scope"])


def test_no_train_alternate_is_a_near_copy_of_a_held_out_question(train, calibration_questions):
    # The sample data's alternates (相似问法) are indexed and trained on: one copying a dev,
    # out-of-scope or calibration question would let the benchmarks and the thresholds see their
    # own questions. They were written from train.json alone; this holds them apart.
    alternates = [alternate for pair in train for alternate in pair.get("alternates", [])]
    assert near_copies(alternates, evaluation_questions() + calibration_questions) == []


def test_every_follow_up_names_train_pairs_and_copies_no_held_out_question(train):
    # data/followups.json measures how a follow-up is read with its conversation
    # (benchmarks/retrieval.py); it is asked, never trained on.
    followups = _load("followups.json")
    instructions = {p["instruction"] for p in train}
    assert len(followups) >= 40
    assert [f for f in followups if f["pair"] not in instructions or f["earlier_pair"] not in instructions] == []
    assert sum(f["pair"] != f["earlier_pair"] for f in followups) >= 30  # most reach a new pair through the context
    turns = [text for f in followups for text in (f["earlier"], f["follow_up"])]
    assert near_copies(turns, evaluation_questions()) == []
