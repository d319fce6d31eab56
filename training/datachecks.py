"""Checks run on a dataset snapshot before training, reported to staff.

Pure Python (no Django, no torch): records in, a report out. Errors block the run; warnings
are shown and the run may go ahead.

Each record is a dict with "id", "question" (the normalised question text used for
comparison), "instruction", "output" and, when a tokenizer is available, "tokens" (the
length of the full training text in tokens).
"""

import math
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher

NEAR_DUPLICATE_RATIO = 0.9
TINY_ANSWER_CHARS = 4
THIN_CURVE_STEPS = 50
FEW_PAIRS = 10


@dataclass
class Finding:
    code: str
    message: str
    pair_ids: list = field(default_factory=list)


@dataclass
class CheckReport:
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.errors

    def as_dict(self):
        return {"ok": self.ok, "errors": [asdict(f) for f in self.errors], "warnings": [asdict(f) for f in self.warnings]}


def _similar(a, b):
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return matcher.real_quick_ratio() >= NEAR_DUPLICATE_RATIO and matcher.ratio() >= NEAR_DUPLICATE_RATIO


def _conflicts(records, report):
    for i, first in enumerate(records):
        for second in records[i + 1 :]:
            if first["output"].strip() == second["output"].strip():
                continue
            ids = [first["id"], second["id"]]
            if first["question"] == second["question"]:
                report.errors.append(
                    Finding("conflict", f"Pairs #{ids[0]} and #{ids[1]} ask the same question with different answers.", ids)
                )
            elif _similar(first["question"], second["question"]):
                report.warnings.append(
                    Finding(
                        "near_conflict",
                        f"Pairs #{ids[0]} and #{ids[1]} ask nearly the same question with different answers.",
                        ids,
                    )
                )


def _leaks(train, dev, report):
    for d in dev:
        for t in train:
            if d["question"] == t["question"]:
                report.errors.append(
                    Finding("dev_leak", f"Dev pair #{d['id']} repeats train pair #{t['id']}: evaluation would be inflated.", [d["id"], t["id"]])
                )
            elif _similar(d["question"], t["question"]):
                report.warnings.append(
                    Finding("dev_near_leak", f"Dev pair #{d['id']} is nearly the same question as train pair #{t['id']}.", [d["id"], t["id"]])
                )


def check_dataset(train, dev, *, max_length, epochs, batch_size, grad_accum=1):
    """Return a CheckReport for the snapshot's train and dev records."""
    report = CheckReport()
    everything = train + dev
    if not train:
        report.errors.append(Finding("no_train", "There are no approved training pairs: approve some pairs first."))
        return report
    _conflicts(everything, report)
    _leaks(train, dev, report)
    for record in everything:
        answer = record["output"].strip()
        if not answer:
            report.errors.append(Finding("empty_answer", f"Pair #{record['id']} has an empty answer.", [record["id"]]))
        elif len(answer) < TINY_ANSWER_CHARS:
            report.warnings.append(
                Finding("tiny_answer", f"Pair #{record['id']} has a very short answer ({answer!r}).", [record["id"]])
            )
        tokens = record.get("tokens")
        if tokens is not None and tokens > max_length:
            report.warnings.append(
                Finding(
                    "too_long",
                    f"Pair #{record['id']} is {tokens} tokens, over max length {max_length}: it will be truncated.",
                    [record["id"]],
                )
            )
    steps = math.ceil(len(train) / (batch_size * grad_accum)) * epochs
    if len(train) < FEW_PAIRS:
        report.warnings.append(
            Finding("few_pairs", f"Only {len(train)} training pairs: the model will learn little; aim for 100 or more.")
        )
    if steps < THIN_CURVE_STEPS:
        report.warnings.append(
            Finding("few_steps", f"{len(train)} pairs × {epochs} epochs = {steps} steps: the loss curve will be thin.")
        )
    if not dev:
        report.warnings.append(Finding("no_dev", "There are no dev pairs: the run cannot be evaluated."))
    return report
