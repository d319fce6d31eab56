"""Two adapter versions' evaluations side by side (the admin's compare page and its JSON).

    version_comparison(a, b)
      -> {"a": {...}, "b": {...}, "metrics": [row...], "modes": [row...], "questions": [row...]}

Each version's run evaluated it on its dev pairs as the chat would answer them (training.grounding):
the scores are in `metrics["eval"]`, and the answers to the dev questions in its `samples`
(question, reference, answer, mode). A metric row says which version did better by the same rule
as activation (services.compare_metrics: lower is better for dev loss and invented numbers).
A question row pairs the two answers to one dev question (matched by its text: versions trained
on different snapshots may have been asked different questions, and a side is None where its
version was not asked it) and marks in each answer the reference's key facts it states, the ones
it misses, and the numbers it states that the reference does not.

Rows keep the metrics' and modes' codes ("name", "mode") and carry their names in the request's
language ("label", "mode_label": training.evaluation_help), as the page shows them.
"""

from llm.evaluation import MODES, fact_spans, key_facts, normalise
from training.evaluation_help import METRIC_HELP, METRIC_LABELS, MODE_LABELS
from training.services import LOWER_IS_BETTER

# In the order the admin's version list and the activation check read them.
METRICS = ("key_fact_recall", "rouge_l_char", "rouge_l_word", "exact_match", "bleu4", "invented_number_share", "dev_loss")
MODE_FIGURES = ("count", "share", "key_fact_recall", "invented_number_share")

# How a piece of an answer is marked: a key fact of the reference it states, or a number it
# states that the reference does not ("" for plain text).
GOT, OTHER = "got", "other"


def version_summary(version):
    return {
        "id": version.pk,
        "name": version.name,
        "is_active": version.is_active,
        "created_at": version.created_at.isoformat(),
        "run": version.run_id,
        "snapshot": version.run.snapshot.sha256[:12],
        "evaluated": bool(version.metrics.get("eval")),
    }


def better_of(name, a, b):
    """"a", "b" or None (equal, or a side not measured) for metric `name`."""
    if a is None or b is None or a == b:
        return None
    lower_wins = name in LOWER_IS_BETTER
    return "a" if (a < b) == lower_wins else "b"


def metric_rows(a_eval, b_eval):
    """One row per metric either version measured: {"name", "label", "help", "a", "b", "better"}."""
    rows = []
    for name in METRICS:
        a, b = a_eval.get(name), b_eval.get(name)
        if a is None and b is None:
            continue
        rows.append({
            "name": name, "label": str(METRIC_LABELS[name]), "help": str(METRIC_HELP.get(name, "")),
            "a": a, "b": b, "better": better_of(name, a, b),
        })
    return rows


def mode_rows(a_eval, b_eval):
    """Per question set (dev, out_of_scope) and mode: each version's figures ({} where it has none)."""
    rows = []
    for set_name, a_report, b_report in (
        ("dev", a_eval, b_eval),
        ("out_of_scope", a_eval.get("out_of_scope") or {}, b_eval.get("out_of_scope") or {}),
    ):
        a_modes, b_modes = a_report.get("modes") or {}, b_report.get("modes") or {}
        for mode in MODES:
            if mode not in a_modes and mode not in b_modes:
                continue
            rows.append({
                "set": set_name,
                "mode": mode,
                "label": str(MODE_LABELS[mode]),
                **{side: {f: modes.get(mode, {}).get(f) for f in MODE_FIGURES} for side, modes in (("a", a_modes), ("b", b_modes))},
            })
    return rows


def marked_answer(answer, wanted):
    """An answer checked against the reference's key facts `wanted`: the facts it states and misses,
    the numbers it states beyond them, and its (normalised) text in pieces [text, mark]."""
    text = normalise(answer)
    stated = key_facts(text)
    pieces, at = [], 0
    for start, end, fact in fact_spans(text):
        if start > at:
            pieces.append([text[at:start], ""])
        pieces.append([text[start:end], GOT if fact in wanted else OTHER])
        at = end
    if at < len(text):
        pieces.append([text[at:], ""])
    return {
        "answer": text,
        "facts_got": [fact for fact in wanted if fact in stated],
        "facts_missed": [fact for fact in wanted if fact not in stated],
        "other_numbers": [fact for fact in stated if fact not in wanted],
        "pieces": pieces,
    }


def mode_of(sample):
    """How the chat would have answered a stored dev answer: its mode's code and name ("" for an
    evaluation made before modes were recorded)."""
    mode = sample.get("mode", "")
    return {"mode": mode, "mode_label": str(MODE_LABELS.get(mode, mode))}


def question_rows(a_samples, b_samples):
    """The dev questions either version answered, in the order asked (a's first), each with both answers."""
    answers = {"a": {s["question"]: s for s in a_samples}, "b": {s["question"]: s for s in b_samples}}
    questions = list(dict.fromkeys([s["question"] for s in a_samples] + [s["question"] for s in b_samples]))
    rows = []
    for question in questions:
        sample = answers["a"].get(question) or answers["b"][question]
        wanted = key_facts(sample["reference"])
        row = {"question": question, "reference": sample["reference"], "key_facts": wanted}
        for side in ("a", "b"):
            asked = answers[side].get(question)
            row[side] = {**marked_answer(asked["prediction"], wanted), **mode_of(asked)} if asked else None
        rows.append(row)
    return rows


def version_comparison(a, b):
    """Versions `a` and `b` (AdapterVersion) compared on their stored evaluations; JSON-ready."""
    a_eval, b_eval = a.metrics.get("eval") or {}, b.metrics.get("eval") or {}
    return {
        "a": version_summary(a),
        "b": version_summary(b),
        "metrics": metric_rows(a_eval, b_eval),
        "modes": mode_rows(a_eval, b_eval),
        "questions": question_rows(a_eval.get("samples") or [], b_eval.get("samples") or []),
    }
