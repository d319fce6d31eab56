"""RAFT records: the gold pair among the retrieved ones at varying positions, the fallback target
in the configured share, only training text, and the same records for the same seed."""

import json
import re

import pytest
from django.conf import settings

from llm.finetune import raft
from llm.finetune.config import CONFIG_FILE
from llm.grounding import DEFAULT_K, NONE, TRAINED_FALLBACK
from llm.prompting import question_text
from llm.retrieval import Entry, Index, customer_text

REFERENCE = re.compile(r"\[(\d+)\] Q: (.*?)\nA: ", re.S)


def _entries(records):
    return [
        Entry(pair_id=n, question=question_text(r["instruction"], r.get("input", "")), answer=r["output"], alternates=tuple(r.get("alternates", ())))
        for n, r in enumerate(records, start=1)
    ]


@pytest.fixture(scope="module")
def shop():
    """The first 24 sample training pairs (the first with two alternates) and their index."""
    records = [
        {key: value for key, value in record.items() if key != "alternates"}  # the sample data's own are not what is tested
        for record in json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[:24]
    ]
    records[0] = {**records[0], "alternates": ["不想要了能退吗", "买错了可以退货不"]}
    entries = _entries(records)
    return entries, Index(entries)


@pytest.fixture(scope="module")
def records(shop):
    entries, index = shop
    return raft.raft_records(entries, index, k=DEFAULT_K, no_gold_share=0.25, seed=7)


def _gold_position(record, entries):
    """1-based position of the pair whose answer is the target, or None when it is not there."""
    for number, question in REFERENCE.findall(record["instruction"]):
        if any(e.question == question.strip() and e.answer.strip() == record["output"].strip() for e in entries):
            return int(number)
    return None


def test_each_example_holds_k_references_and_the_gold_pair_at_varying_positions(shop, records):
    entries, _index = shop
    answered = [r for r in records if r["output"] != TRAINED_FALLBACK]
    assert all(len(REFERENCE.findall(r["instruction"])) == DEFAULT_K for r in records)
    positions = [_gold_position(r, entries) for r in answered]
    assert None not in positions
    counts = {p: positions.count(p) for p in set(positions)}
    assert set(counts) == {1, 2, 3} and min(counts.values()) >= len(answered) / 6  # spread, not all first
    assert all(r["input"] == "" and r["instruction"].startswith("<references>") for r in records)


def test_the_configured_share_answers_the_fallback_without_the_gold_pair(shop, records):
    entries, index = shop
    fallback = [r for r in records if r["output"] == TRAINED_FALLBACK]
    assert len(fallback) == round(0.25 * len(records))
    # Asked only the curated questions and alternates, each example's own pair is known: where the
    # target is the fallback, its answer is in none of the references.
    plain = raft.raft_records(entries, index, no_gold_share=0.25, variants=0, seed=7)
    owner = {q: e for e in entries for q in (e.question, *e.alternates)}
    without = [r for r in plain if r["output"] == TRAINED_FALLBACK]
    assert len(without) == round(0.25 * len(plain)) > 0
    for record in without:
        references, question = record["instruction"].rsplit("\nQuestion: ", 1)
        assert owner[question].answer.strip() not in references
    for record in plain:
        if record["output"] != TRAINED_FALLBACK:
            references, question = record["instruction"].rsplit("\nQuestion: ", 1)
            assert record["output"] == owner[question].answer and owner[question].answer.strip() in references


def test_no_gold_share_zero_and_one_are_all_or_nothing(shop):
    entries, index = shop
    assert all(r["output"] != TRAINED_FALLBACK for r in raft.raft_records(entries[:6], index, no_gold_share=0.0))
    assert all(r["output"] == TRAINED_FALLBACK for r in raft.raft_records(entries[:6], index, no_gold_share=1.0))
    with pytest.raises(ValueError):
        raft.raft_records(entries, index, no_gold_share=1.5)


def test_each_pair_is_asked_its_question_and_as_many_more_alternates_first_then_rewrites(shop, records):
    entries, _index = shop
    asked = [r["instruction"].rsplit("\nQuestion: ", 1)[1] for r in records]
    first = entries[0]
    # the pair with alternates is asked its question and both of them, no rewrite
    assert asked.count(first.question) == 1 and all(asked.count(a) == 1 for a in first.alternates)
    rng = __import__("random").Random(3)
    assert raft.training_questions(first, rng, variants=2) == [first.question, *first.alternates]
    assert raft.training_questions(first, rng, variants=1) == [first.question, first.alternates[0]]
    # the others: their question and two rewrites each, so every pair weighs the same
    others = [q for q in asked if q != first.question and q not in first.alternates]
    rewrites = [q for q in others if q not in {e.question for e in entries}]
    assert len(others) == 3 * (len(entries) - 1) and len(rewrites) == 2 * (len(entries) - 1)
    assert all(not q.startswith("用户问") for q in rewrites)  # as customers type them
    # a rewrite is not the curated question, so it (nearly always: a question's last clause kept
    # alone may still be part of one) does not stand verbatim in the references
    verbatim = sum(q in r["instruction"].split("\nQuestion: ")[0] for q, r in zip(asked, records) if q in rewrites)
    assert verbatim <= len(rewrites) / 10


CANDIDATE = re.compile(r"^\[(\d)\] (.*)$", re.M)


def test_selection_records_name_the_gold_pair_at_varying_numbers_or_none(shop):
    entries, index = shop
    selection = raft.selection_records(entries, index, k=DEFAULT_K, none_share=0.25, seed=7)
    owner = {customer_text(q): e for e in entries for q in (e.question, *e.alternates)}
    assert len(selection) == 2 * len(entries)  # the curated question itself is never asked
    assert sum(r["output"] == NONE for r in selection) == round(0.25 * len(selection))
    numbers, known = [], 0
    for record in selection:
        body, question = record["instruction"].removesuffix("\nSame as:").rsplit("\nQuestion: ", 1)
        candidates = dict(CANDIDATE.findall(body))
        assert len(candidates) == DEFAULT_K and record["input"] == ""
        pair = owner.get(question)  # None for a rewrite
        known += pair is not None
        if record["output"] == NONE:
            assert pair is None or customer_text(pair.question) not in candidates.values()
        else:
            numbers.append(record["output"])
            assert pair is None or candidates[record["output"]] == customer_text(pair.question)
    assert known == 2  # the one pair with alternates: asked those; the others, rewrites
    assert not any(q.removesuffix("\nSame as:").rsplit("\nQuestion: ", 1)[1] == customer_text(e.question) for q in [r["instruction"] for r in selection] for e in entries)
    assert set(numbers) == {"1", "2", "3"} and min(numbers.count(n) for n in "123") >= len(numbers) / 6
    assert raft.selection_records(entries, index, none_share=0.25, seed=7) == selection
    with pytest.raises(ValueError):
        raft.selection_records(entries, index, k=10)


def test_no_dev_or_out_of_scope_text_reaches_the_records(records):
    dev = json.loads(settings.CSP_SAMPLE_DATA[1].read_text(encoding="utf-8"))
    oos = json.loads(settings.CSP_OUT_OF_SCOPE_DATA.read_text(encoding="utf-8"))
    text = "\n".join(r["instruction"] for r in records)
    for question in [customer_text(r["instruction"]) for r in dev] + [q["question"] for q in oos]:
        assert question not in text


def test_the_same_seed_gives_the_same_records_and_another_seed_others(shop, records):
    entries, index = shop
    assert raft.raft_records(entries, index, k=DEFAULT_K, no_gold_share=0.25, seed=7) == records
    assert raft.raft_records(entries, index, k=DEFAULT_K, no_gold_share=0.25, seed=8) != records


def test_dev_records_are_asked_with_what_the_training_index_returns(shop):
    entries, index = shop
    dev = [{"instruction": "用户问：商品收到后不喜欢，能退吗？", "input": "", "output": entries[0].answer}]
    [record] = raft.grounded_dev_records(dev, index)
    assert record["output"] == entries[0].answer
    assert record["instruction"].endswith("\nQuestion: 商品收到后不喜欢，能退吗？")
    assert len(REFERENCE.findall(record["instruction"])) == DEFAULT_K


def test_an_adapter_records_its_grounding_and_one_trained_before_reads_none(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"lora_r": 8, "prompt_format": "gemma"}))
    assert raft.read_grounding(tmp_path) is None
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"lora_r": 8, "prompt_format": "gemma", **raft.grounding_record(4)}))
    assert raft.read_grounding(tmp_path) == raft.Grounding(format="references-v1", k=4, select="candidates-v1")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"lora_r": 8, **raft.grounding_record(3, select=False)}))
    assert raft.read_grounding(tmp_path) == raft.Grounding(format="references-v1", k=3, select=None)
    assert raft.read_grounding(tmp_path / "missing") is None
