"""Thresholds of the answer modes, calibrated per training run on what the run did not train on.

Paraphrases of the training questions (the calibration set, or a run's dev pairs without one:
training.grounding.calibrate) are asked against an index of the training pairs only (a paraphrase
never finds itself, as an unseen paraphrase at serving would not), and out-of-scope questions
against the same index. From their top-1 scores ("dev" below and in the report: the paraphrases):

- curated threshold: the lowest dev top-1 score at or above which the top pair is the right one
  for at least 99% of the dev questions there (right: its curated answer is the dev pair's), and
  never above 0.999 (VERBATIM: a question asked word for word is always curated). With no such
  score, 0.999.
- fallback threshold: as many out-of-scope questions below it as possible while at least 95% of
  the dev questions stay at or above it. Retrieval scores alone do not separate the two sets
  (paraphrases of a shop's questions and other shop questions read alike: on the sample data a
  rule keeping 90% of out-of-scope below lost 54% of dev), so the threshold only screens out what
  is clearly elsewhere; between it and the curated threshold the grounded adapter, trained (RAFT)
  to say when its references hold no answer, and the fact guard decide. With k = floor(5% of the
  dev count) dev questions allowed below, it lies midway between the (k+1)-th lowest dev score
  and the next lower score of either set. Never above the curated threshold; 0.0 without dev
  questions. The report gives the out-of-scope share it screens out.

- confidence bar (Thresholds.confident): of the questions whose top-1 score lies between the two,
  the lowest confidence (llm.grounding.confidence: the score and the top pair's lead over the next)
  at or above which the top pair is right for at least 99% of them, out-of-scope questions counted
  wrong; None when no confidence gives that (nothing between the thresholds is curated by it).

Without dev pairs there is nothing to calibrate on: the built-in DEFAULT_THRESHOLDS stay.

Small sets make coarse thresholds: with 24 dev pairs, 99% precision means no wrong top-1 at all
above the threshold. `calibrate` returns the thresholds with the precision and shares they give,
which the version page shows. Pure Python: no Django, no torch.
"""

import math
from dataclasses import dataclass, field, replace

from llm.evaluation import normalise
from llm.grounding import (
    DEFAULT_CHOICE_MIN,
    DEFAULT_THRESHOLDS,
    GROUNDED,
    Thresholds,
    choice_labels,
    confidence,
    decide,
    selection_question,
)

CURATED_PRECISION = 0.99
DEV_KEPT = 0.95
# A question asked word for word scores 1.0 (to float error: 0.99999...): always curated, whatever
# the dev set says.
VERBATIM = 0.999
# A pick bar no probability reaches: the adapter's picks decide nothing (every unsure answer is generated).
PICK_NEVER = 1.01


@dataclass(frozen=True)
class Calibration:
    thresholds: Thresholds
    report: dict = field(default_factory=dict)  # JSON: what the thresholds give on the sets


def top_scores(index, questions):
    """(top-1 score, top-1 hit) per question; score 0.0 and hit None when nothing is retrieved."""
    scored = []
    for question in questions:
        hits = index.search(question, k=1)
        scored.append((hits[0].score, hits[0]) if hits else (0.0, None))
    return scored


def calibrate(dev, out_of_scope, *, precision=CURATED_PRECISION, dev_kept=DEV_KEPT):
    """dev: [(top-1 score, top-1 is right)]; out_of_scope: [top-1 score]. Returns a Calibration."""
    dev = [(float(score), bool(right)) for score, right in dev]
    oos = sorted(float(score) for score in out_of_scope)

    curated = VERBATIM
    for candidate in sorted({score for score, _ in dev}):
        above = [right for score, right in dev if score >= candidate]
        if sum(above) / len(above) >= precision:
            curated = candidate
            break

    dev_scores = sorted(score for score, _ in dev)
    if dev_scores:
        allowed = math.floor((1 - dev_kept) * len(dev_scores) + 1e-9)
        edge = dev_scores[allowed]  # the lowest dev score kept above the threshold
        lower = [s for s in [*oos, *dev_scores] if s < edge]
        fallback = (edge + max(lower)) / 2 if lower else max(0.0, edge - 1e-6)
    else:
        fallback = 0.0
    capped = fallback > curated
    fallback = min(fallback, curated)
    thresholds = Thresholds(curated=round(min(curated, VERBATIM), 6), fallback=round(fallback, 6))
    if not dev:  # nothing to calibrate on (a knowledge base without dev pairs): keep the defaults
        thresholds = DEFAULT_THRESHOLDS

    def share(items):
        return len(items) / len(dev) if dev else None

    curated_dev = [right for score, right in dev if score >= thresholds.curated]
    report = {
        "rule": f"curated: lowest dev top-1 score with >= {precision:.0%} top-1 precision at or above it; "
        f"fallback: >= {dev_kept:.0%} of dev at or above it, most out-of-scope below",
        "dev_count": len(dev),
        "out_of_scope_count": len(oos),
        "curated_threshold": thresholds.curated,
        "fallback_threshold": thresholds.fallback,
        "fallback_capped_at_curated": capped,
        # of the dev questions at or above the curated threshold, the share whose top pair is right
        "curated_precision": sum(curated_dev) / len(curated_dev) if curated_dev else None,
        "dev_curated_share": share(curated_dev),
        "dev_top1_accuracy": share([r for _, r in dev if r]),
        "dev_fallback_share": share([s for s, _ in dev if s < thresholds.fallback]),
        "out_of_scope_fallback_share": sum(s < thresholds.fallback for s in oos) / len(oos) if oos else None,
        "out_of_scope_curated_share": sum(s >= thresholds.curated for s in oos) / len(oos) if oos else None,
    }
    return Calibration(thresholds, report)


def calibrate_on(index, dev_pairs, oos_questions):
    """Calibrate with `index` (the training pairs only): dev_pairs [(question, reference answer)],
    oos_questions [question]. A dev question's top-1 is right when its answer is the reference.
    The curated and fallback thresholds come from `calibrate`, the confidence bar from the
    questions between them (`confident_report`)."""
    dev_hits = [hit for _score, hit in top_scores(index, [q for q, _ in dev_pairs])]
    oos_hits = [hit for _score, hit in top_scores(index, oos_questions)]
    rights = [hit is not None and normalise(hit.answer) == normalise(answer) for hit, (_q, answer) in zip(dev_hits, dev_pairs)]
    calibrated = calibrate(
        [(_score(hit), right) for hit, right in zip(dev_hits, rights)], [_score(hit) for hit in oos_hits],
    )
    if not dev_pairs:
        return calibrated
    outcomes = confident_outcomes([*zip(dev_hits, rights), *((hit, False) for hit in oos_hits)], calibrated.thresholds)
    extra = confident_report(outcomes)
    thresholds = replace(calibrated.thresholds, confident=extra["confident_threshold"])
    return Calibration(thresholds, {**calibrated.report, **extra})


def _score(hit):
    return hit.score if hit is not None else 0.0


def confident_outcomes(questions, thresholds):
    """[(confidence, right)] of the questions [(top hit or None, whether it is the right pair)] whose
    top-1 score lies between the curated and fallback thresholds: what the confidence bar is fitted on."""
    return [
        (confidence(hit), bool(right))
        for hit, right in questions
        if hit is not None and thresholds.fallback <= hit.score < thresholds.curated
    ]


def precision_bar(outcomes, *, precision=CURATED_PRECISION):
    """The lowest value at or above which the outcomes [(value, right)] are right for at least
    `precision` of them; None when no value gives that."""
    for candidate in sorted({value for value, _ in outcomes}):
        above = [right for value, right in outcomes if value >= candidate]
        if sum(above) / len(above) >= precision:
            return round(candidate, 6)
    return None


def _bar_and_above(outcomes, precision):
    """(precision_bar of the outcomes, [right] of those at or above it)."""
    bar = precision_bar(outcomes, precision=precision)
    return bar, [right for value, right in outcomes if bar is not None and value >= bar]


def confident_report(outcomes, *, precision=CURATED_PRECISION):
    """The report entries of a calibrated confidence bar (JSON): the bar (None: off), how many
    questions lay between the thresholds, how many of their top pairs were right, and how many of
    those the bar makes curated."""
    bar, above = _bar_and_above(outcomes, precision)
    return {
        "confident_threshold": bar,
        "confident_count": len(outcomes),
        "confident_right": sum(right for _, right in outcomes),
        "confident_curated": len(above),
        "confident_precision": sum(above) / len(above) if above else None,
    }


# --- the adapter's pick among the retrieved pairs (llm.grounding.choose) ---


def pick_outcomes(index, paraphrases, oos_questions, thresholds, choose, *, k):
    """[(probability of the likeliest label, whether that label is right)] of the adapter's pick for
    each question serving would put to it: those whose top-1 score lies between the thresholds.
    `choose(prompt, labels) -> probabilities` (labels: llm.grounding.choice_labels). A paraphrase
    [(question, reference answer)] is picked right when the named pair's answer is the reference,
    or "none" when no candidate has it; an out-of-scope question only by "none"."""
    outcomes = []
    for question, reference in [*paraphrases, *((question, None) for question in oos_questions)]:
        hits = tuple(index.search(question, k=k))
        if decide(hits, thresholds, can_ground=True).mode != GROUNDED:
            continue
        candidates = hits[:k]
        probs = choose(selection_question(question, candidates), choice_labels(len(candidates)))
        if not probs:
            continue
        best = max(range(len(probs)), key=probs.__getitem__)
        answers = [normalise(hit.answer) for hit in candidates]
        if best == 0:
            right = reference is None or normalise(reference) not in answers
        else:
            right = reference is not None and answers[best - 1] == normalise(reference)
        outcomes.append((float(probs[best]), bool(right)))
    return outcomes


def pick_bar(outcomes, *, precision=CURATED_PRECISION):
    """The lowest probability at or above which the picks `outcomes` ([(probability, right)]) are
    right for at least `precision` of them: the bar a pick must reach to decide the answer (a pair's
    curated answer, or the fallback for "none"), held to the curated threshold's precision since a
    sure pick answers verbatim. None when no probability gives that (the picks then decide nothing)."""
    return precision_bar(outcomes, precision=precision)


def pick_report(outcomes, *, precision=CURATED_PRECISION):
    """The report entries of a calibrated pick bar (JSON): the bar (None: picks decide nothing), how
    many picks it was fitted on, how many were right, and the share at or above the bar."""
    bar, above = _bar_and_above(outcomes, precision)
    return {
        "pick_min_prob": bar,
        "pick_count": len(outcomes),
        "pick_right": sum(right for _, right in outcomes),
        "pick_decided_share": len(above) / len(outcomes) if outcomes else None,
    }


def pick_min_prob(report, configured=None):
    """How likely a pick must be to decide the answer: `configured` (CSP_RERANK_MIN_PROB) when set,
    else the bar calibrated into `report` (a version's calibration; PICK_NEVER where no bar held),
    else DEFAULT_CHOICE_MIN for versions calibrated before picks were."""
    if configured is not None:
        return configured
    report = report or {}
    if "pick_min_prob" in report:
        return PICK_NEVER if report["pick_min_prob"] is None else report["pick_min_prob"]
    return DEFAULT_CHOICE_MIN
