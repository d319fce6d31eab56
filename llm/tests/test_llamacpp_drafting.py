"""Prompt-lookup drafting in the llama.cpp engine: the answers are the ones decoding without
drafts gives, token for token, while drafts are verified and taken.

A grounded answer in miniature: the tiny model's adapter memorised four `faq` answers, each
asked with that answer in the message as its reference, so every answer copies a span of its
own prompt and the drafts from it are right. How drafts are proposed is tested in
test_drafting.py.
"""

import threading

import pytest

from llm.engine import EngineConfig, LlamaCppEngine, Token
from llm.tests.test_engine import _answer, _question


@pytest.fixture(scope="module")
def grounded(faq):
    """Four questions, each with its answer as the reference in the message."""
    return [dict(record, input=f"参考：{_answer(record)}") for record in faq[:4]]


@pytest.fixture(scope="module")
def copying_adapter(adapter_cache, tiny_model, grounded):
    """An adapter that memorised the grounded answers: each copies its reference."""
    return adapter_cache.memorised(tiny_model, grounded)


@pytest.fixture
def llama(tiny_model, copying_adapter, engines):
    """make(draft_tokens=...): a llama.cpp engine serving the copying adapter."""

    def make(**overrides):
        engine = LlamaCppEngine(EngineConfig(**{"base_dir": tiny_model, "threads": 1, **overrides}))
        engines.append(engine)
        engine.set_adapter("m", copying_adapter)
        return engine

    return make


def _answers(engine, histories, **options):
    """(text, token ids, finish reason) of each history's answer, one after the other."""
    answers = []
    for history in histories:
        request = engine.submit(history, **options)
        text, stats = request.result(60)
        answers.append((text, request.token_ids, stats.finish_reason))
    return answers


def test_greedy_answers_with_drafts_are_token_for_token_those_without(llama, faq, grounded):
    # The grounded questions, and questions without a reference that the adapter rambles on.
    histories = [_question(r) for r in grounded] + [_question(r) for r in faq[4:6]]
    plain = _answers(llama(draft_tokens=0), histories)
    drafting = llama(draft_tokens=8)
    assert _answers(drafting, histories) == plain
    metrics = drafting.metrics()
    assert metrics["draft_accepted_tokens"] > 0  # the grounded answers were copied from the prompt
    assert metrics["drafted_tokens"] >= metrics["draft_accepted_tokens"]
    tokens = sum(len(ids) for _, ids, _ in plain)
    assert metrics["decode_steps"] < tokens - len(histories)  # fewer forwards than tokens after the first


def test_an_answer_copied_from_its_prompt_takes_several_tokens_per_step(llama, grounded):
    engine = llama(draft_tokens=8)
    text, stats = engine.generate(_question(grounded[0]), timeout=60)
    assert text == _answer(grounded[0])
    # One step gave the first token (the prefill); the others came in fewer steps than tokens.
    assert engine.decode_steps < stats.tokens - 1
    assert engine.metrics()["draft_accepted_tokens"] >= (stats.tokens - 1) // 2


def test_drafted_and_sampled_answers_share_the_batch_and_each_is_its_own(llama, grounded):
    histories = [_question(r) for r in grounded]
    sampled = {"temperature": 1.0, "top_p": 0.9}
    alone = llama(draft_tokens=8)
    greedy_alone = _answers(alone, histories)
    sampled_alone = [_answers(alone, [h], seed=i, **sampled)[0] for i, h in enumerate(histories)]

    engine = llama(draft_tokens=8)
    queued = threading.Event()
    hold = _held_until(queued)  # the first token waits for all eight: they decode together
    requests = []
    for i, history in enumerate(histories):
        requests.append(engine.submit(history, on_event=hold))
        requests.append(engine.submit(history, seed=i, on_event=hold, **sampled))
    queued.set()
    results = [(r.result(60)[0], r.token_ids, r.result(60)[1].finish_reason) for r in requests]
    assert results[0::2] == greedy_alone
    assert results[1::2] == sampled_alone
    assert engine.max_batch_seen == len(requests)
    assert engine.metrics()["draft_accepted_tokens"] > 0


def _held_until(gate):
    """An on_event that holds the decode thread on the first Token until `gate` is set."""

    def on_event(event):
        if isinstance(event, Token):
            gate.wait(30)

    return on_event


def test_max_new_tokens_caps_the_draft_and_the_answer_ends_exactly_there(llama, grounded):
    history = _question(grounded[0])
    full = _answers(llama(draft_tokens=0), [history])[0][1]
    engine = llama(draft_tokens=8)
    for limit in (2, 5, 9):
        assert limit < len(full)
        text, ids, reason = _answers(engine, [history], max_new_tokens=limit)[0]
        assert (ids, reason) == (full[:limit], "length")
    assert engine.metrics()["draft_accepted_tokens"] > 0


def test_cancelling_during_drafted_steps_ends_the_answer_and_frees_its_cells(llama, grounded):
    engine = llama(draft_tokens=8)
    history = _question(grounded[1])
    pieces, handle = [], {}

    def on_event(event):  # on the decode thread: cancels after the second piece of text
        if isinstance(event, Token):
            pieces.append(event.text)
            if len(pieces) == 2:
                handle["request"].cancel()

    handle["request"] = request = engine.submit(history, on_event=on_event)
    text, stats = request.result(60)
    assert stats.finish_reason == "cancelled"
    assert stats.tokens < len(_answers(llama(draft_tokens=0), [history])[0][1])
    # The sequence id and its cells are free again: the same conversation answers in full.
    assert _answers(engine, [history])[0][0] == _answer(grounded[1])
    assert engine.metrics()["running"] == 0


def test_no_step_drafts_while_more_chats_decode_than_the_limit(llama, grounded, monkeypatch):
    from llm.engine import llamacpp

    histories = [_question(r) for r in grounded]
    drafting = llama(draft_tokens=8)
    plain = _answers(drafting, histories)
    assert drafting.metrics()["drafted_tokens"] > 0  # one chat at a time: within the limit

    monkeypatch.setattr(llamacpp, "DRAFT_MAX_DECODING", 0)  # even one decoding chat is too many
    limited = llama(draft_tokens=8)
    assert _answers(limited, histories) == plain
    assert limited.metrics()["drafted_tokens"] == 0
