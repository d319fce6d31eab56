"""A training run's grounded side: its index, RAFT records, calibrated thresholds and per-mode evaluation.

Everything here sees the snapshot's TRAIN pairs only: the index is built from train.jsonl, so a
dev pair never retrieves itself (an unseen paraphrase at serving finds only its siblings), the
RAFT records come from the training pairs alone, and the dev pairs and the out-of-scope questions
(CSP_OUT_OF_SCOPE_DATA) are only asked, for the evaluation (and for the thresholds when no
calibration set, CSP_CALIBRATION_DATA, asks this run's pairs). The pure work is
llm's (llm.finetune.raft, llm.calibration, llm.evaluation); this module feeds it the run's data.
"""

import json

from django.conf import settings

from knowledge.retrieval import DatabaseEmbeddingCache
from llm import calibration, evaluation
from llm.finetune import raft
from llm.generation import choice_probabilities, generate_answer
from llm.prompting import question_text
from llm.retrieval import Entry, Index, customer_text, default_embedder


def record_entry(record):
    """A snapshot record (train.jsonl) as the index sees it."""
    return Entry(
        pair_id=record["id"],
        question=question_text(record["instruction"], record.get("input", "")),
        answer=record["output"],
        alternates=tuple(record.get("alternates") or ()),
    )


def train_index(snapshot, train_records):
    """The index over the snapshot's training pairs only (embeddings shared through the database)."""
    embedder = default_embedder()
    return Index(
        [record_entry(r) for r in train_records], embedder=embedder, cache=DatabaseEmbeddingCache(embedder.name),
        stamp=f"snapshot:{snapshot.sha256[:16]}:train",
    )


def fit_records(index, train_records, dev_records, config):
    """(train records, dev records, grounding) that train_model fits: RAFT-style with CSP_RAFT
    (grounding is what the adapter records), else the pairs as they are (grounding None)."""
    if not settings.CSP_RAFT:
        return train_records, dev_records, None
    k = settings.CSP_GROUNDING_K
    entries = [record_entry(r) for r in train_records]
    share, variants = settings.CSP_RAFT_NO_GOLD_SHARE, settings.CSP_RAFT_VARIANTS
    records = raft.raft_records(entries, index, k=k, no_gold_share=share, variants=variants, seed=config.seed)
    if settings.CSP_RERANK:
        records += raft.selection_records(entries, index, k=k, none_share=share, variants=variants, seed=config.seed)
    return records, raft.grounded_dev_records(dev_records, index, k=k), raft.grounding_record(k, select=settings.CSP_RERANK)


def out_of_scope_questions():
    """The questions of CSP_OUT_OF_SCOPE_DATA ([{"question": ...}] or plain strings); none when it is missing."""
    path = settings.CSP_OUT_OF_SCOPE_DATA
    if not path.is_file():
        return []
    items = json.loads(path.read_text(encoding="utf-8"))
    return [item if isinstance(item, str) else item.get("question") or item.get("instruction", "") for item in items]


def dev_questions(dev_records):
    """[(question as a customer types it, reference answer)] of the dev records."""
    return [(customer_text(question_text(r["instruction"], r.get("input", ""))), r["output"]) for r in dev_records]


# A calibration file is used when at least this many of its paraphrases ask this run's training
# pairs (it was written for this knowledge base); else the run calibrates on its dev split.
MIN_CALIBRATION_PARAPHRASES = 10


def calibration_set(train_records):
    """(paraphrases [(question, reference answer)], out-of-scope questions) of CSP_CALIBRATION_DATA
    that ask this run's training pairs, or None when the file is missing or written for other pairs
    (fewer than MIN_CALIBRATION_PARAPHRASES of its paraphrases name a training pair's instruction).

    The file: {"paraphrases": [{"question", "pair": a train pair's instruction}], "out_of_scope": [question]}.
    Raises ValueError, naming the file, when it is not one (the run fails with that message).
    """
    path = settings.CSP_CALIBRATION_DATA
    if not path or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        items, out_of_scope = data.get("paraphrases", []), data.get("out_of_scope", [])
        asked = [(item["question"], item["pair"]) for item in items]
        if not all(isinstance(text, str) for pair in asked for text in pair) or not all(isinstance(q, str) for q in out_of_scope):
            raise TypeError("a question or pair is not a string")
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(
            f"CSP_CALIBRATION_DATA {path} is not a calibration set "
            f'({{"paraphrases": [{{"question", "pair"}}], "out_of_scope": [question]}}): {error!r}'
        ) from None
    answers = {record["instruction"]: record["output"] for record in train_records if not record.get("input")}
    paraphrases = [(question, answers[pair]) for question, pair in asked if pair in answers]
    if len(paraphrases) < MIN_CALIBRATION_PARAPHRASES:
        return None
    return paraphrases, [question for question in out_of_scope if question]


def calibrate(index, train_records, dev_records):
    """The run's thresholds (llm.calibration), fitted on the calibration set (CSP_CALIBRATION_DATA)
    when it asks this run's pairs, so the dev pairs and the out-of-scope questions stay for measuring
    (the run's evaluation, benchmarks/fidelity.py); else on the dev pairs and the out-of-scope
    questions. The report's "calibrated_on" says which."""
    paraphrases, oos, source = calibration_questions(train_records, dev_records)
    calibrated = calibration.calibrate_on(index, paraphrases, oos)
    calibrated.report["calibrated_on"] = source
    return calibrated


def calibration_questions(train_records, dev_records):
    """(paraphrases [(question, reference answer)], out-of-scope questions, "calibration_set" or
    "dev_split"): what `calibrate` and `calibrate_pick` fit on."""
    chosen = calibration_set(train_records)
    if chosen is not None:
        return (*chosen, "calibration_set")
    return dev_questions(dev_records), out_of_scope_questions(), "dev_split"


def _k_and_picks(grounding):
    """(k, whether the adapter was trained to pick) of an adapter's grounding: the record written at
    training (a dict, raft.grounding_record) or the one read back (raft.read_grounding)."""
    if isinstance(grounding, dict):
        return grounding["k"], grounding.get("select")
    return getattr(grounding, "k", settings.CSP_GROUNDING_K), getattr(grounding, "select", None)


def calibrate_pick(model, tokenizer, config, index, calibrated, train_records, dev_records, *, grounding, prompt_format=None):
    """Add the pick bar (llm.calibration.pick_report) to `calibrated.report` when the adapter was
    trained to pick (and CSP_RERANK is on): its picks on the same calibration questions, among
    those that fall between the calibrated thresholds, as serving would ask them. A pick must
    reach that bar to decide an answer; with no bar (picks not right often enough), they decide
    nothing. Returns the bar the run's evaluation uses (llm.calibration.pick_min_prob)."""
    k, picks = _k_and_picks(grounding)
    if not (picks and settings.CSP_RERANK):
        return calibration.pick_min_prob(calibrated.report, settings.CSP_RERANK_MIN_PROB)
    paraphrases, oos, _source = calibration_questions(train_records, dev_records)

    def choose(prompt, labels):
        return choice_probabilities(model, tokenizer, prompt, labels, system=config.system_prompt, prompt_format=prompt_format)

    outcomes = calibration.pick_outcomes(index, paraphrases, oos, calibrated.thresholds, choose, k=k)
    calibrated.report.update(calibration.pick_report(outcomes))
    return calibration.pick_min_prob(calibrated.report, settings.CSP_RERANK_MIN_PROB)


def evaluate_served(
    model, tokenizer, config, index, thresholds, dev_records, *, grounding, prompt_format=None, log=None, min_prob=None,
):
    """The dev pairs and the out-of-scope questions (each at most CSP_EVAL_MAX_PAIRS) answered as
    the chat would with these thresholds, reported per mode (llm.evaluation.evaluate_served).

    grounding: the adapter's (raft.read_grounding / grounding_record), None for one trained on
    bare questions, which serving never asks for a grounded answer. min_prob: the bar a pick must
    reach (calibrate_pick; None: CSP_RERANK_MIN_PROB or the default). Returns {} with no dev pairs.
    """
    limit = settings.CSP_EVAL_MAX_PAIRS
    dev = dev_questions(dev_records)[:limit]
    if not dev:
        return {}
    oos = out_of_scope_questions()[:limit]
    k, picks = _k_and_picks(grounding)

    def generate(prompt):
        return generate_answer(
            model, tokenizer, prompt, "", max_new_tokens=settings.CSP_EVAL_MAX_NEW_TOKENS, system=config.system_prompt,
            prompt_format=prompt_format,
        )

    def choose(prompt, labels):
        return choice_probabilities(model, tokenizer, prompt, labels, system=config.system_prompt, prompt_format=prompt_format)

    if min_prob is None:
        min_prob = calibration.pick_min_prob({}, settings.CSP_RERANK_MIN_PROB)
    asks = picks and settings.CSP_RERANK and min_prob <= 1.0  # a bar no pick reaches: none is asked
    choice = dict(choose=choose, min_prob=min_prob) if asks else {}

    def answer(questions, label):
        answers = []
        for number, question in enumerate(questions, start=1):
            hits = index.search(question, k=k)
            answers.append(
                evaluation.answer_as_served(question, hits, thresholds, can_ground=grounding is not None, generate=generate, k=k, **choice)
            )
            if log and number % 10 == 0:
                log(f"answered {number}/{len(questions)} {label} questions as served")
        return answers

    dev_answers = answer([q for q, _ in dev], "dev")
    results = evaluation.evaluate_served(dev_answers, [a for _, a in dev])
    # Every dev answer (at most CSP_EVAL_MAX_PAIRS): the compare page (training.compare) shows two versions' side by side.
    results["samples"] = [
        {"question": a.question, "reference": ref, "prediction": a.text, "mode": a.mode} for a, (_, ref) in zip(dev_answers, dev)
    ]
    if oos:
        oos_answers = answer(oos, "out-of-scope")
        results["out_of_scope"] = evaluation.evaluate_served(oos_answers)
        results["out_of_scope"]["samples"] = [{"question": a.question, "prediction": a.text, "mode": a.mode} for a in oos_answers[:5]]
    # The gate's number: answers stating an invented number, over dev and out-of-scope together.
    results["dev_invented_number_share"] = results["invented_number_share"]
    results["dev_invented_answers"] = results["invented_answers"]
    results["invented_answers"] += results.get("out_of_scope", {}).get("invented_answers", 0)
    results["invented_number_share"] = results["invented_answers"] / (len(dev) + len(oos))
    results["thresholds"] = {"curated": thresholds.curated, "fallback": thresholds.fallback, "confident": thresholds.confident}
    return results
