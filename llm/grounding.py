"""Grounded answers: which of three modes answers a question, and what the model reads.

Every answer comes from the curated Q&A. The retriever (`llm.retrieval`) ranks the approved
pairs for a question; `decide` turns its hits into a mode:

- `curated`: the best pair is a confident match (its score reaches the curated threshold, or its
  score and its lead over the next pair together reach the confidence bar: `confidence`); its
  curated answer is given verbatim (no model).
- `grounded`: the top k pairs go into the prompt (`grounded_question`) and the adapter answers
  from them; it was trained on the same rendering (RAFT, `llm.finetune.raft`).
- `fallback`: nothing is close enough; the configured reply offers a person instead.

Between the two thresholds a version trained to pick (`SELECT_FORMAT`) is first asked which of
the top k pairs, if any, asks what the customer asks (`selection_question`, one token of answer:
the pair's number or 0). `choose` turns its answer into the mode: a confident pick answers with
that pair's curated text, a confident "none" with the fallback, an unsure one is left grounded.
This is the rerank of the retriever's candidates by the trained adapter: e5 puts the right pair
in the top 3 far more often than first (benchmarks/retrieval.py), and a verbatim curated answer
carries every fact.

Pure Python: no Django, no torch. The rendering here is the one place a reference block is
written, for training and for serving alike.
"""

from dataclasses import dataclass

from llm.retrieval import customer_text

CURATED = "curated"
GROUNDED = "grounded"
FALLBACK = "fallback"
MODES = (CURATED, GROUNDED, FALLBACK)
# How a generated answer ends when the fact guard replaced it: by the best curated answer, or by
# the fallback reply (the trained "no answer" sentence too). Besides the engine's finish reasons.
CORRECTED = "corrected"
FINISH_REASONS = (CORRECTED, FALLBACK)

# Recorded as finetune_config.json["grounding"] by a RAFT-trained adapter: the prompt rendering
# below. An adapter without it was trained on bare questions and is served that way.
GROUNDING_FORMAT = "references-v1"
DEFAULT_K = 3
# Recorded as finetune_config.json["select"] by an adapter also trained to name the matching pair
# among the retrieved candidates (`selection_question`); answered with NONE or a number from 1.
SELECT_FORMAT = "candidates-v1"
NONE = "0"
# A pick (or "none") at least this likely decides the mode; below it the answer is generated.
DEFAULT_CHOICE_MIN = 0.5

# What a RAFT-trained adapter learns to say when its references do not hold the answer. Serving
# holds generated text back while it could still be this sentence, and when it is, answers in
# the fallback mode with the configured reply (CSP_FALLBACK_REPLY) instead.
TRAINED_FALLBACK = "抱歉，资料中没有这个问题的答案。"


# How much a top hit's lead over the next pair (Hit.lead) counts in its confidence. Chosen on the
# sample data's calibration set (data/calibration.json, never dev or out-of-scope): fitting the bar on
# half of it and counting on the other half (20 random halvings), a weight of 2 made the most
# paraphrases between the thresholds curated (28.7 right against 1.4 wrong a halving; 0.5: 22.4 /
# 1.7, 1: 25.3 / 1.6, 3: 26.9 / 1.7, 6: 21.6 / 1.8).
LEAD_WEIGHT = 2.0
# the largest confidence there is: a score of 1 leading every other pair's by 1
MAX_CONFIDENCE = 1.0 + LEAD_WEIGHT


def confidence(hit):
    """How surely the question is `hit`'s pair's and no other's: its score plus LEAD_WEIGHT times its
    lead over the next pair. A paraphrase's score alone says little (e5's cosines of a question with
    its right and wrong neighbours lie close together); one that also stands clear of every other
    pair is more often right. On the calibration set, of the questions between the default
    thresholds, 28 paraphrases were curated by it with none wrong where the score alone reached none."""
    return hit.score + LEAD_WEIGHT * hit.lead


@dataclass(frozen=True)
class Thresholds:
    """Scores (the top hit's `score`, 0..1) that pick a mode, and the confidence (`confidence`) that
    makes a match between them curated."""

    curated: float  # at or above: the top pair's curated answer, verbatim
    fallback: float  # below: nothing is close enough
    # Between the two: at or above this confidence the top pair's curated answer too (a clear match),
    # without the model. None: off (versions calibrated before it; llm.calibration fits it).
    confident: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.fallback <= self.curated <= 1.0:
            raise ValueError(f"thresholds need 0 <= fallback ({self.fallback}) <= curated ({self.curated}) <= 1")
        if self.confident is not None and not 0.0 <= self.confident <= MAX_CONFIDENCE:
            raise ValueError(f"the confidence bar ({self.confident}) must lie between 0 and {MAX_CONFIDENCE}")

    @property
    def correction(self):
        """The score at which the best pair's curated answer replaces a generated answer the fact
        guard stopped (below it: the fallback reply). Grounded answers are asked only below the
        curated threshold, so the bar is lower: halfway between the two."""
        return (self.fallback + self.curated) / 2


# Used until a training run calibrated its own (the version page shows them) and no setting
# overrides them: llm.calibration's rule on the sample data's calibration set (data/calibration.json:
# 120 paraphrases, 60 out-of-scope questions, against the 113 train pairs with their alternates),
# printed by benchmarks/retrieval.py (four or five alternates a pair since session 10): curated 0.961 (no
# wrong top pair at or above it: 29% of the paraphrases), fallback 0.921 (5% of the paraphrases
# and 70% of its out-of-scope questions below it), confidence bar 0.995 (20 of the 97 questions
# between those two curated, none wrong). Not fitted on data/dev.json or data/out_of_scope.json,
# which measure them.
DEFAULT_THRESHOLDS = Thresholds(curated=0.961, fallback=0.921, confident=0.995)


@dataclass(frozen=True)
class Decision:
    mode: str
    hits: tuple  # the retrieved pairs (llm.retrieval.Hit), best first
    reason: str  # why this mode, for logs and the admin

    @property
    def best(self):
        return self.hits[0] if self.hits else None


def decide(hits, thresholds, *, can_ground=True):
    """The mode for a question whose retrieved pairs are `hits` (best first).

    can_ground is False when no adapter serves the question (a fresh install): the base model
    never learned the knowledge base or to read references, and the top pair of a match below the
    curated threshold and the confidence bar may be another question's (or the question is not
    the shop's at all), so such a match gets the fallback reply. An adapter trained before grounding can ground: it
    answers the bare question as it was trained, and the fact guard checks it.
    """
    hits = tuple(hits)
    if not hits:
        return Decision(FALLBACK, hits, "nothing retrieved")
    score = hits[0].score
    if score < thresholds.fallback:
        return Decision(FALLBACK, hits, f"best match {score:.3f} below the fallback threshold {thresholds.fallback:.3f}")
    if score >= thresholds.curated:
        return Decision(CURATED, hits, f"best match {score:.3f} at or above the curated threshold {thresholds.curated:.3f}")
    sure = confidence(hits[0])
    if thresholds.confident is not None and sure >= thresholds.confident:
        return Decision(
            CURATED, hits,
            f"best match {score:.3f} leads the next pair by {hits[0].lead:.3f}: confidence {sure:.3f} "
            f"at or above {thresholds.confident:.3f}",
        )
    if not can_ground:
        return Decision(FALLBACK, hits, f"best match {score:.3f} below the curated threshold and no version to answer from it")
    return Decision(GROUNDED, hits, f"best match {score:.3f} between the thresholds")


def render_references(references):
    """The reference block: each pair's question and curated answer, numbered from 1.

    references: objects with .question and .answer (retrieval hits), in prompt order.
    """
    blocks = [f"[{number}] Q: {ref.question.strip()}\nA: {ref.answer.strip()}" for number, ref in enumerate(references, 1)]
    return "<references>\n" + "\n\n".join(blocks) + "\n</references>"


def grounded_question(question, references):
    """The user turn a grounded adapter reads: the references, then the customer's question."""
    return f"{render_references(references)}\nQuestion: {question.strip()}"


def selection_question(question, candidates):
    """The user turn a picking adapter reads: the candidate pairs' questions, numbered from 1, then
    the customer's question; its answer is one token, the matching number or NONE.

    candidates: objects with .question (retrieval hits), in prompt order (at most 9).
    """
    if len(candidates) > 9:
        raise ValueError("at most 9 candidates: each is answered with one digit")
    lines = [f"[{number}] {customer_text(c.question)}" for number, c in enumerate(candidates, 1)]
    return "<candidates>\n" + "\n".join(lines) + f"\n</candidates>\nQuestion: {question.strip()}\nSame as:"


def choice_labels(count):
    """What a picking adapter may answer for `count` candidates: NONE, then "1".."count"."""
    return [NONE, *(str(number) for number in range(1, count + 1))]


def choose(decision, probs, *, min_prob=DEFAULT_CHOICE_MIN):
    """The decision after a picking adapter answered `selection_question` over the first
    len(probs) - 1 of `decision.hits`, with the probabilities `probs` of choice_labels.

    A pick at least `min_prob` likely makes the picked pair's curated answer the answer (it moves
    first among the hits, which keep their retrieval ranks); NONE that likely gives the fallback;
    anything less sure leaves the decision as it was (grounded).
    """
    if decision.mode != GROUNDED or not probs:
        return decision
    best = max(range(len(probs)), key=probs.__getitem__)
    probability = probs[best]
    among = len(probs) - 1
    if probability < min_prob:
        return Decision(GROUNDED, decision.hits, f"{decision.reason}; the adapter named no pair surely ({probability:.2f})")
    if best == 0:
        return Decision(FALLBACK, decision.hits, f"{decision.reason}; the adapter found none of the top {among} a match ({probability:.2f})")
    picked = decision.hits[best - 1]
    hits = (picked, *(hit for hit in decision.hits if hit is not picked))
    return Decision(CURATED, hits, f"{decision.reason}; the adapter picked [{best}] of the top {among} ({probability:.2f})")
