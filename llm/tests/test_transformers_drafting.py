"""Prompt-lookup drafting in the transformers engine (llm.engine.transformers, llm.engine.batch),
on the tiny model (the root conftest's `tiny_model`, a Qwen2): a greedy answer decoded with drafts
is token for token the answer decoded without, alone and in batches that mix drafted greedy rows
with sampled ones, on full attention and on sliding-window attention.

Drafts need something to copy. `_grounded` puts the model's own answer to a question in an
earlier turn and asks the question again: the prompt then holds text close to what the model
will say, as a grounded prompt's reference block holds the curated answers.
"""

import threading
import time

import pytest

from llm.engine import Engine, EngineConfig, Token, Turn
from llm.tests.support import question as _question

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def make_engine(tiny_model):
    """Factory of transformers engines (fp32, on the tiny model unless base_dir says otherwise);
    closes every engine it made after the test."""
    engines = []

    def make(**overrides):
        config = EngineConfig(**{"base_dir": tiny_model, "dtype": "float32", "max_new_tokens": 60, **overrides})
        engine = Engine(config)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def sliding_model(tiny_model, tmp_path_factory):
    """The tiny model's weights with a 16-token sliding window on its last two layers (the first
    keeps full attention, as Gemma 3 mixes both kinds)."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    settings = AutoConfig.from_pretrained(tiny_model).to_dict()
    settings.update(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None)
    config = Qwen2Config(**settings)
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    out = tmp_path_factory.mktemp("sliding-model")
    Qwen2ForCausalLM.from_pretrained(tiny_model, config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def _ids(engine, history, **options):
    request = engine.submit(history, **options)
    request.result(60)
    return list(request.token_ids)


def _grounded(engine, record):
    """A conversation that holds, in an earlier turn, the answer `engine` gives to the question it ends with."""
    question = _question(record)
    answer, _ = engine.generate(question)
    return [Turn("user", question), Turn("assistant", answer), Turn("user", question)]


def _spy_on_verifies(engine):
    """Record (tokens taken, alive) of every greedy row's step: `_accept_verified`'s result."""
    seen = []
    verify = engine._accept_verified

    def spy(sequence, predicted, draft):
        result = verify(sequence, predicted, draft)
        seen.append(result)
        return result

    engine._accept_verified = spy
    return seen


def test_greedy_answers_with_drafts_are_the_answers_without(make_engine, records):
    plain, drafted = make_engine(draft_tokens=0), make_engine(draft_tokens=8)
    tokens = 0
    for record in records[:4]:
        for history in (_question(record), _grounded(plain, record)):
            expected = _ids(plain, history)
            assert _ids(drafted, history) == expected
            tokens += len(expected)
    assert drafted.counters.draft_accepted > 0
    # Without drafts every token after the first (the prefill's) costs a decode step.
    assert drafted.decode_steps < tokens - 8


def test_drafted_and_sampled_rows_joining_at_different_times_answer_as_they_would_alone(make_engine, records):
    plain = make_engine(draft_tokens=0, max_new_tokens=80)
    engine = make_engine(draft_tokens=8, max_new_tokens=80, max_active=5)
    greedy = [_grounded(plain, records[0]), _grounded(plain, records[1]), _question(records[2])]
    sampled = [
        (_question(records[3]), {"temperature": 1.0, "seed": 5}),
        (_question(records[4]), {"temperature": 0.8, "top_p": 0.9, "seed": 9}),
    ]
    expected = [_ids(plain, history) for history in greedy] + [_ids(engine, q, **options) for q, options in sampled]
    counted = {"tokens": 0}

    def slow(event):  # holds the first request on the decode thread, so the others join it while it runs
        if isinstance(event, Token):
            counted["tokens"] += 1
            time.sleep(0.01)

    accepted = engine.counters.draft_accepted
    requests = [engine.submit(greedy[0], on_event=slow)]
    later = [(history, {}) for history in greedy[1:]] + sampled
    for joins_after, (history, options) in zip((3, 6, 9, 12), later):
        deadline = time.monotonic() + 10
        while counted["tokens"] < joins_after and time.monotonic() < deadline:
            time.sleep(0.005)
        requests.append(engine.submit(history, **options))
    for request in requests:
        request.result(60)
    assert [list(r.token_ids) for r in requests] == expected
    assert engine.max_batch_seen >= 3
    assert engine.counters.draft_accepted > accepted


def test_max_new_tokens_reached_within_an_accepted_draft_ends_with_exactly_that_many(make_engine, records):
    plain = make_engine(draft_tokens=0, max_new_tokens=60)
    engine = make_engine(draft_tokens=8, max_new_tokens=60)
    history = _grounded(plain, records[3])
    full = _ids(plain, history)
    verifies = _spy_on_verifies(engine)
    ended_in_a_draft = False
    for limit in range(2, 40):
        verifies.clear()
        request = engine.submit(history, max_new_tokens=limit)
        _, stats = request.result(60)
        assert (stats.tokens, stats.finish_reason) == (limit, "length")
        assert list(request.token_ids) == full[:limit]
        taken, alive = verifies[-1]
        ended_in_a_draft |= taken > 1 and not alive
    assert ended_in_a_draft  # some answer took its last tokens several at a time


def test_cancel_in_the_middle_of_a_drafted_answer_stops_it_and_the_engine_goes_on(make_engine, records):
    plain = make_engine(draft_tokens=0, max_new_tokens=80)
    engine = make_engine(draft_tokens=8, max_new_tokens=80)
    history = _grounded(plain, records[1])
    full = _ids(engine, history)
    seen, after_cancel, handle = [], [], {}
    submitted = threading.Event()

    def on_event(event):  # on the decode thread: cancels right after the fifth piece of text
        submitted.wait(5)
        request = handle["request"]
        if isinstance(event, Token):
            (after_cancel if request.cancelled else seen).append(event.text)
            if len(seen) == 5:
                request.cancel()

    handle["request"] = engine.submit(history, on_event=on_event)
    submitted.set()
    text, stats = handle["request"].result(10)
    assert stats.finish_reason == "cancelled" and after_cancel == [] and text == "".join(seen)
    assert stats.tokens < len(full) and list(handle["request"].token_ids) == full[: stats.tokens]
    assert _ids(engine, history) == full


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # the masks' two forms: boolean, additive
def test_answers_across_a_sliding_window_are_the_same_with_drafts(make_engine, records, sliding_model, attention):
    plain = make_engine(base_dir=sliding_model, draft_tokens=0)
    engine = make_engine(base_dir=sliding_model, draft_tokens=8, max_active=4)
    for each in (plain, engine):
        each.load()
        each.model.set_attn_implementation(attention)
    histories = [_grounded(plain, r) for r in (records[0], records[5])] + [_question(records[6]), _grounded(plain, records[7])]
    expected = [_ids(plain, history) for history in histories]
    # The window is in force (the answers are not the full-attention model's) and every prompt is
    # longer than it.
    assert _ids(make_engine(draft_tokens=0), histories[2]) != expected[2]
    assert all(len(plain.render(history).ids) > 16 for history in histories)
    holes = []

    def watch(event):  # on the decode thread: whether rows have holes (columns of rejected drafts)
        holes.append(engine._batch.holes)

    gate = threading.Event()
    first = engine.submit(histories[0], on_event=lambda event: (gate.wait(10), watch(event)))
    requests = [first] + [engine.submit(history, on_event=watch) for history in histories[1:]]
    gate.set()  # all four are queued: they decode together
    for request in requests:
        request.result(60)
    assert [list(r.token_ids) for r in requests] == expected
    assert engine.max_batch_seen == 4 and engine.counters.draft_accepted > 0
    assert any(holes)  # the masks from real positions were needed, and used
