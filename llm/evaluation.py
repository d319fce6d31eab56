"""Scores for generated answers against reference answers (Chinese customer-service Q&A).

Pure and fast: no Django, no torch. The training task generates one answer per dev question
(`llm.generation.generate_answer`) and calls

    from llm.evaluation import evaluate
    evaluate(predictions, references)
    # {"count": 2, "exact_match": 0.5, "rouge_l_char": ..., "rouge_l_word": ..., "bleu4": ...,
    #  "key_fact_recall": ..., "key_facts": 3, "examples": [...]}

Every score is a fraction between 0 and 1 (BLEU too, where sacrebleu says 0-100). A customer
cares most that the numbers are right (7天, 99元, 400-820-1234), which ROUGE and BLEU barely
weigh, hence key_fact_recall.

With grounded answers the training task asks each dev and out-of-scope question as the chat
would (`answer_as_served`: retrieval, the mode, the adapter only in the grounded mode, the fact
guard) and reports per mode with `evaluate_served`: the share of answers, key-fact recall and the
share of answers with an invented number.
"""

import logging
import re
import unicodedata
from dataclasses import dataclass

import jieba
import sacrebleu
from rouge_chinese import Rouge

from llm import facts
from llm.grounding import (
    CURATED,
    DEFAULT_CHOICE_MIN,
    DEFAULT_K,
    FALLBACK,
    GROUNDED,
    MODES,
    TRAINED_FALLBACK,
    choice_labels,
    decide,
    grounded_question,
    selection_question,
)
from llm.grounding import choose as pick

jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO on first use

METRIC_HELP = {
    "exact_match": (
        "Share of answers identical to the reference (after trimming spaces); 1.0 means every answer was "
        "reproduced word for word."
    ),
    "rouge_l_char": (
        "ROUGE-L F1 on characters: how much of the reference appears, in order, in the answer (0-1), "
        "forgiving different word choice."
    ),
    "rouge_l_word": (
        "ROUGE-L F1 on words cut by jieba: like the character score but counts whole words, so it is stricter"
        " about wording (0-1)."
    ),
    "bleu4": (
        "BLEU-4 over all answers (sacrebleu, Chinese tokenisation), scaled 0-1: how many 1- to 4-character "
        "runs of the reference the answers share, penalising short answers."
    ),
    "key_fact_recall": (
        "Share of the numbers in the references (days, amounts, ranges like 1-3, phone numbers) that the "
        "answers state exactly; wrong numbers are the costliest mistakes."
    ),
}

# A number, a range or phone number made of numbers joined by dashes, and an optional unit.
# "个工作日" is left out of the units on purpose: "1-3" is the fact, however the days are named.
KEY_FACT = re.compile(
    r"(?<![\d.])"
    r"\d+(?:\.\d+)?(?:\s*[-~～—–]\s*\d+(?:\.\d+)?)*"
    r"(?:%|天|元|块|小时|分钟|个月|月|年|周|折|倍|次|件|张|份|台|积分|公斤|kg|KG)?"
    r"(?![\d])"
)
# "1. 进入…" or "2、点击…": numbered steps, not facts.
LIST_MARKER = re.compile(r"[.．、)）](?!\d)")


def normalise(text):
    """NFKC (full-width digits and punctuation become ASCII) and trimmed."""
    return unicodedata.normalize("NFKC", text or "").strip()


def fact_spans(text):
    """Where the numeric facts stand in `normalise(text)`: [(start, end, fact)], in order, repeats
    included; `fact` is written as key_facts gives it (no spaces, "-" for any dash). For showing
    an answer with its facts marked."""
    text = normalise(text)
    spans = []
    for match in KEY_FACT.finditer(text):
        fact = re.sub(r"\s+", "", match.group())
        if fact.isdigit() and LIST_MARKER.match(text, match.end()):
            continue
        spans.append((match.start(), match.end(), re.sub(r"[~～—–]", "-", fact)))
    return spans


def key_facts(text):
    """The numeric facts in a text, in order, without repeats: ["7天", "99元", "1-3", ...]."""
    return list(dict.fromkeys(fact for _start, _end, fact in fact_spans(text)))


def _rouge_l(prediction_tokens, reference_tokens):
    if not reference_tokens or not prediction_tokens:
        return float(reference_tokens == prediction_tokens)
    score = Rouge(metrics=["rouge-l"]).get_scores(" ".join(prediction_tokens), " ".join(reference_tokens))
    return score[0]["rouge-l"]["f"]


def _characters(text):
    return [ch for ch in text if not ch.isspace()]


def _words(text):
    return [word for word in jieba.lcut(text) if word.strip()]


def evaluate(predictions, references):
    """Score predictions against references (two equally long lists of strings)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {"count": 0, **{name: None for name in METRIC_HELP}, "key_facts": 0, "examples": []}

    examples = []
    facts_total = facts_found = 0
    for prediction, reference in zip(predictions, references):
        prediction, reference = normalise(prediction), normalise(reference)
        wanted = key_facts(reference)
        stated = set(key_facts(prediction))
        missing = [fact for fact in wanted if fact not in stated]
        facts_total += len(wanted)
        facts_found += len(wanted) - len(missing)
        examples.append(
            {
                "exact_match": prediction == reference,
                "rouge_l_char": _rouge_l(_characters(prediction), _characters(reference)),
                "rouge_l_word": _rouge_l(_words(prediction), _words(reference)),
                "key_facts": wanted,
                "missing_facts": missing,
            }
        )

    count = len(examples)
    bleu = sacrebleu.corpus_bleu(
        [normalise(p) for p in predictions], [[normalise(r) for r in references]], tokenize="zh"
    )
    return {
        "count": count,
        "exact_match": sum(e["exact_match"] for e in examples) / count,
        "rouge_l_char": sum(e["rouge_l_char"] for e in examples) / count,
        "rouge_l_word": sum(e["rouge_l_word"] for e in examples) / count,
        "bleu4": min(1.0, bleu.score / 100),
        # None rather than 1.0 when the references state no numbers: nothing was measured.
        "key_fact_recall": facts_found / facts_total if facts_total else None,
        "key_facts": facts_total,
        "examples": examples,
    }


# --- Answers as serving gives them, per mode (grounded answers) ---

INVENTED_HELP = (
    "Share of answers that state a number found neither in the reference answer nor in the retrieved "
    "pairs' answers (nor the question): an invented number."
)


@dataclass(frozen=True)
class ServedAnswer:
    """One question answered as the chat would: its final mode and text."""

    question: str
    mode: str  # llm.grounding.CURATED / GROUNDED / FALLBACK, after the fact guard
    text: str
    hits: tuple  # the retrieved pairs (llm.retrieval.Hit), best first
    guarded: bool = False  # a generated answer the fact guard replaced


def answer_as_served(
    question, hits, thresholds, *, can_ground, generate, k=DEFAULT_K, fallback_reply=TRAINED_FALLBACK, choose=None,
    min_prob=DEFAULT_CHOICE_MIN,
):
    """Answer `question` as serving does, given its retrieved `hits`.

    The mode comes from llm.grounding.decide; curated is the top pair's answer; grounded is
    `generate(grounded_question(question, top k))`, the adapter's greedy answer, where the trained
    "no answer" sentence is the fallback and an answer with a fact the guard finds in neither the
    references nor the question is replaced by the top curated answer when its score reaches
    `thresholds.correction`, else by the fallback. With `choose(prompt, labels) -> probabilities`
    (an adapter trained to pick), a grounded decision is first put to it (llm.grounding.choose)
    over the top k, as serving does.
    """
    hits = tuple(hits)
    decision = decide(hits, thresholds, can_ground=can_ground)
    if decision.mode == GROUNDED and choose is not None:
        candidates = hits[:k]
        probs = choose(selection_question(question, candidates), choice_labels(len(candidates)))
        decision = pick(decision, probs, min_prob=min_prob)
    if decision.mode == CURATED:
        return ServedAnswer(question, CURATED, decision.best.answer, decision.hits)
    if decision.mode == FALLBACK:
        return ServedAnswer(question, FALLBACK, fallback_reply, hits)
    references = hits[:k]
    text = generate(grounded_question(question, references))
    if normalise(text).startswith(normalise(TRAINED_FALLBACK)):  # as serving reads it (chat.grounding)
        return ServedAnswer(question, FALLBACK, fallback_reply, hits)
    if facts.unsupported(text, [ref.answer for ref in references] + [question]):
        if decision.best.score >= thresholds.correction:
            return ServedAnswer(question, CURATED, decision.best.answer, hits, guarded=True)
        return ServedAnswer(question, FALLBACK, fallback_reply, hits, guarded=True)
    return ServedAnswer(question, GROUNDED, text, hits)


def _number_values(text):
    return {value for fact in key_facts(text) for value in re.findall(r"\d+(?:\.\d+)?", fact)}


def invented_numbers(text, sources):
    """The numbers `text` states (by value, list markers aside) that no source text states."""
    known = set().union(*(_number_values(source) for source in sources)) if sources else set()
    return sorted(_number_values(text) - known)


def evaluate_served(answers, references=None):
    """Per-mode report of ServedAnswers; references (same order) for the dev pairs, None for the
    out-of-scope questions (no reference: key-fact recall is not measured, only invented numbers).

    Returns {"count", "modes": {mode: {"count", "share", "key_fact_recall", "invented_number_share"}},
    "invented_number_share", "invented_answers", "guarded"} plus, with references, the overall
    scores of `evaluate` (without its per-answer examples).
    """
    answers = list(answers)
    refs = list(references) if references is not None else [None] * len(answers)
    if len(refs) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(refs)} references")
    invented = [
        bool(invented_numbers(a.text, [a.question, *(h.answer for h in a.hits), *([r] if r else [])])) for a, r in zip(answers, refs)
    ]
    count = len(answers)
    modes = {}
    for mode in MODES:
        chosen = [i for i, a in enumerate(answers) if a.mode == mode]
        scores = evaluate([answers[i].text for i in chosen], [refs[i] for i in chosen]) if references is not None else {}
        modes[mode] = {
            "count": len(chosen),
            "share": len(chosen) / count if count else None,
            "key_fact_recall": scores.get("key_fact_recall"),
            "key_facts": scores.get("key_facts"),
            "invented_number_share": sum(invented[i] for i in chosen) / len(chosen) if chosen else None,
        }
    report = {
        "count": count,
        "modes": modes,
        "invented_number_share": sum(invented) / count if count else None,
        "invented_answers": sum(invented),
        "guarded": sum(a.guarded for a in answers),
    }
    if references is not None:
        overall = evaluate([a.text for a in answers], refs)
        report.update({name: value for name, value in overall.items() if name != "examples"})
    return report
