"""The engine contract, on both backends, on the tiny model (the `tiny_model` fixture in the root conftest).

Every test that uses `make_engine` runs twice: on the transformers Engine and on the llama.cpp
LlamaCppEngine (the tiny model's f32 GGUF, adapters converted to GGUF LoRAs). Tests of one
backend's own machinery are marked `transformers_only`; the llama.cpp side's own tests are in
test_llamacpp_engine.py.

Two adapters are trained once a session (the root conftest's `adapter_cache`) with the memorising
settings of tests/support/memorise.py: v1 on eight sample pairs, v2 on four of the same questions with
their answers rotated, so the two versions give different, known answers to the same question.
Requests that must still be running while the test acts are slowed down by an `on_event`
callback (it runs on the decode thread), never by sleeping and hoping.
"""

import asyncio
import threading
import time

import pytest
import torch

from llm.engine import (
    Done,
    Engine,
    EngineBusy,
    EngineClosed,
    EngineConfig,
    InputTooLong,
    LlamaCppEngine,
    Token,
    Turn,
)
from llm.basemodel import BaseModelError
from llm.generation import generate_answer
from llm.modeling import load_adapter, load_base
from llm.prompting import render_conversation, render_training_example
from llm.tests.support import question as _question  # the name the other engine tests import from here

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINES = {"transformers": Engine, "llamacpp": LlamaCppEngine}
transformers_only = pytest.mark.parametrize("backend", ["transformers"])


def _answer(record):
    return record["output"].strip()


@pytest.fixture(scope="module")
def rotated(records):
    """v2's data: the first four questions, each with the next one's answer."""
    return [dict(r, output=records[(i + 1) % 4]["output"]) for i, r in enumerate(records[:4])]


@pytest.fixture(scope="module")
def adapters(adapter_cache, tiny_model, records, rotated):
    """{"v1": adapter dir, "v2": adapter dir}, each with its adapter.gguf (shared: copy one to change it)."""
    return {"v1": adapter_cache.memorised(tiny_model, records), "v2": adapter_cache.memorised(tiny_model, rotated)}


@pytest.fixture(params=sorted(ENGINES))
def backend(request):
    return request.param


def engine_factory(backend, base_dir):
    """Yields a factory of `backend`'s engines on the checkpoint base_dir (fp32, as training
    evaluates; one llama.cpp thread, as torch gets one); closes every engine it made after."""
    engines = []

    def make(**overrides):
        config = EngineConfig(**{"base_dir": base_dir, "dtype": "float32", "threads": 1, **overrides})
        engine = ENGINES[backend](config)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def make_engine(tiny_model, backend):
    """Engine factory of the backend on the tiny model."""
    yield from engine_factory(backend, tiny_model)


def _slow(delay, started=None):
    """An on_event that holds the decode thread `delay` s per token (and says when the first came)."""

    def on_event(event):
        if isinstance(event, Token):
            if started is not None:
                started.set()
            time.sleep(delay)

    return on_event


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_constructing_an_engine_loads_nothing(make_engine, tmp_path):
    engine = make_engine()
    assert not engine.loaded
    assert engine.tokenizer is None and engine.metrics()["loaded"] is False
    # Even a wrong path is only noticed on first use, with a message that names it.
    missing = make_engine(base_dir=tmp_path / "nowhere")
    with pytest.raises(BaseModelError, match="nowhere"):
        missing.generate("你好")
    engine.load()
    assert engine.loaded


def test_engine_renders_a_one_turn_conversation_exactly_as_training(make_engine, records, tiny_model):
    record = records[0]
    for system in ("", "你是星河商城的客服。"):
        engine = make_engine(system_prompt=system)
        prompt = engine.render([Turn("user", _question(record))])
        training_prompt, _ = render_training_example(record["instruction"], record["input"], record["output"], system=system)
        assert prompt.text == training_prompt
        assert prompt.ids == engine.tokenizer(training_prompt, add_special_tokens=True)["input_ids"]
        assert prompt.dropped_turns == 0


def test_greedy_answer_with_adapter_equals_training_generate_answer(make_engine, records, adapters, tiny_model):
    model, tokenizer = load_adapter(tiny_model, adapters["v1"])
    engine = make_engine()
    engine.set_adapter("v1", adapters["v1"])
    for record in records[:4]:
        expected = generate_answer(model, tokenizer, record["instruction"], record["input"], max_new_tokens=256)
        text, stats = engine.generate([Turn("user", _question(record))])
        assert text == expected == _answer(record)
        assert stats.finish_reason == "stop" and stats.adapter == "v1"
        assert stats.tokens == len(tokenizer(expected, add_special_tokens=False)["input_ids"])
        assert 0 < stats.first_token_ms <= stats.latency_ms


def test_streamed_text_of_a_rambling_model_equals_its_full_decode(make_engine, backend, records, tiny_model):
    # The random base model emits Chinese characters split over several byte-level tokens (and
    # stray bytes): every Token must be complete text, and together they must be the full decode
    # of the ids the engine generated. A backend is compared with itself: the random model's logits
    # are near-ties, and llama.cpp's AVX-512 kernels round them differently from its AVX2 ones and
    # from torch's, so another backend's greedy tokens part from these after a few and would test
    # rounding, not streaming.
    engine = make_engine(max_new_tokens=80)
    if backend == "transformers":  # the same library's own greedy decode: the same tokens
        model, tokenizer = load_base(tiny_model)
    for record in records[:3]:
        events = []
        request = engine.submit(_question(record), on_event=events.append)
        text, stats = request.result(30)
        tokens = [event.text for event in events if isinstance(event, Token)]
        full = engine.tokenizer.decode(request.token_ids, skip_special_tokens=True)
        assert text == "".join(tokens) == full.rstrip("\ufffd").strip()
        assert len(request.token_ids) == stats.tokens > 20 and isinstance(events[-1], Done)
        assert not any(token.endswith("\ufffd") or not token for token in tokens)
        if backend == "transformers":
            expected = generate_answer(model, tokenizer, record["instruction"], record["input"], max_new_tokens=80)
            assert text == expected.rstrip("\ufffd").strip()


def test_four_concurrent_streams_are_decoded_in_one_batch_and_all_answer_correctly(make_engine, records, adapters):
    engine = make_engine()
    engine.set_adapter("v1", adapters["v1"])

    async def answer(record):
        pieces = []
        async for event in engine.stream([Turn("user", _question(record))]):
            if isinstance(event, Token):
                pieces.append(event.text)
            else:
                assert isinstance(event, Done)
                return "".join(pieces), event.stats

    async def main():
        return await asyncio.gather(*(answer(r) for r in records[:4]))

    results = asyncio.run(main())
    for (text, stats), record in zip(results, records[:4]):
        assert text == _answer(record)
        assert stats.finish_reason == "stop"
    assert engine.max_batch_seen == 4
    assert engine.metrics()["running"] == 0


def test_admission_beyond_active_plus_waiting_is_refused_at_once(make_engine, records):
    engine = make_engine(max_active=1, max_waiting=2)
    gate, started = threading.Event(), threading.Event()

    def hold(event):  # keeps the one running request (and so the queue) where it is
        if isinstance(event, Token):
            started.set()
            gate.wait(10)

    first = engine.submit(_question(records[0]), on_event=hold)
    assert started.wait(5)
    queued = [engine.submit(_question(r)) for r in records[1:3]]
    assert engine.metrics()["running"] == 1 and engine.metrics()["waiting"] == 2
    began = time.monotonic()
    with pytest.raises(EngineBusy) as busy:
        engine.submit(_question(records[3]))
    assert time.monotonic() - began < 0.5
    assert isinstance(busy.value.retry_after, int) and busy.value.retry_after >= 1
    for request in [first, *queued]:
        request.cancel()
    gate.set()
    for request in [first, *queued]:
        assert request.result(5)[1].finish_reason == "cancelled"
    assert queued[0].stats.tokens == 0
    engine.submit(_question(records[3])).cancel()  # room again


def test_a_long_prompt_is_prefilled_in_chunks_while_running_streams_keep_decoding(make_engine, records):
    engine = make_engine(prefill_chunk=16, max_new_tokens=200)
    started, seen = threading.Event(), {}
    running = engine.submit(_question(records[0]), on_event=lambda event: started.set())
    assert started.wait(5)
    history = []
    for record in records:
        history += [Turn("user", _question(record)), Turn("assistant", _answer(record))]
    history.append(Turn("user", "好的"))

    def on_done(event):  # on the decode thread, as the long prompt's first (and only) token is taken
        if isinstance(event, Done):
            seen.update(steps=engine.decode_steps, running_done=running.done)

    steps_before = engine.decode_steps
    long = engine.submit(history, max_new_tokens=1, on_event=on_done)
    long.result(20)
    running.cancel()
    running.result(20)
    chunks = -(-len(long.prompt.ids) // 16)
    assert chunks >= 20
    # One decode step of the running stream per prompt chunk: it never waited for the whole prompt.
    assert seen["steps"] - steps_before >= chunks - 1
    assert seen["running_done"] is False


def test_cancel_stops_generation_within_one_step(make_engine, records):
    engine = make_engine()
    seen, after_cancel, handle = [], [], {}
    submitted = threading.Event()

    def on_event(event):  # on the decode thread: cancels right after the third piece of text
        submitted.wait(5)
        request = handle["request"]
        if isinstance(event, Token):
            (after_cancel if request.cancelled else seen).append(event.text)
            if len(seen) == 3:
                request.cancel()

    handle["request"] = engine.submit(_question(records[0]), on_event=on_event)
    submitted.set()
    text, stats = handle["request"].result(10)
    assert stats.finish_reason == "cancelled"
    assert after_cancel == []
    assert stats.tokens <= len(seen) + 2 < engine.config.max_new_tokens  # a token may be text-less (half a character)
    assert text == "".join(seen)


def test_closing_the_consumer_task_cancels_its_generation(make_engine, records):
    engine = make_engine()
    finished = []

    async def main():
        got_tokens = asyncio.Event()

        async def consume():
            count = 0
            async for event in engine.stream(_question(records[0]), on_event=finished.append):
                count += isinstance(event, Token)
                if count == 3:
                    got_tokens.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_tokens.wait(), 5)
        task.cancel()  # what a websocket consumer does on disconnect
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _wait_for(lambda: any(isinstance(e, Done) for e in finished))
    stats = finished[-1].stats
    assert stats.finish_reason == "cancelled" and stats.tokens < engine.config.max_new_tokens


def test_a_request_over_its_wall_clock_cap_ends_with_reason_timeout(make_engine, records):
    engine = make_engine(max_seconds=0.3)
    _, stats = engine.generate(_question(records[0]), on_event=_slow(0.05), timeout=10)
    assert stats.finish_reason == "timeout"
    assert 0 < stats.tokens < engine.config.max_new_tokens
    assert 300 <= stats.latency_ms < 1500


def test_client_limits_are_clamped_to_the_server_caps(make_engine, records):
    engine = make_engine(max_new_tokens=5, max_temperature=1.5)
    _, stats = engine.generate(_question(records[0]), max_new_tokens=10_000)
    assert (stats.tokens, stats.finish_reason) == (5, "length")
    _, stats = engine.generate(_question(records[0]), max_new_tokens=2)
    assert (stats.tokens, stats.finish_reason) == (2, "length")
    request = engine.submit(_question(records[0]), temperature=9.0, top_p=3.0, seed=1)
    assert (request.temperature, request.top_p) == (1.5, 1.0)
    assert request.result(10)[1].tokens <= 5
    with pytest.raises(ValueError):
        engine.submit(_question(records[0]), max_new_tokens=0)


def test_hot_swap_serves_new_requests_with_the_new_adapter_while_old_ones_finish(make_engine, backend, records, rotated, adapters):
    engine = make_engine()
    engine.set_adapter("v1", adapters["v1"])
    started = threading.Event()
    # The v1 request is held 10 ms per token on the decode thread: still running through the swap.
    old = engine.submit(_question(records[1]), on_event=_slow(0.01, started))
    assert started.wait(5)

    engine.set_adapter("v2", adapters["v2"])
    assert not old.done
    assert engine.loaded_adapters == ["v1", "v2"]  # v1 stays while a request uses it
    new = engine.submit(_question(rotated[0]))
    assert (old.adapter, new.adapter) == ("v1", "v2")

    old_text, old_stats = old.result(20)
    new_text, new_stats = new.result(20)
    assert (old_text, old_stats.adapter) == (_answer(records[1]), "v1")
    assert (new_text, new_stats.adapter) == (_answer(rotated[0]), "v2")  # v2's answer, not v1's
    assert new_text != _answer(records[0])
    # transformers decodes both adapters in one batch (PEFT's per-row adapters); llama.cpp applies
    # a LoRA to a whole context, so each version decodes in its own context's batch.
    assert engine.max_batch_seen == (2 if backend == "transformers" else 1)
    assert _wait_for(lambda: engine.loaded_adapters == ["v2"])  # v1 deleted once unused

    engine.set_adapter(None)  # back to the base model
    _, stats = engine.generate(_question(rotated[0]), max_new_tokens=5)
    assert stats.adapter is None
    assert _wait_for(lambda: engine.loaded_adapters == [])


def test_long_histories_lose_their_oldest_turns_and_keep_the_system_prompt(make_engine, records):
    engine = make_engine(max_input_tokens=200, system_prompt="你是客服。")
    history = []
    for record in records:
        history += [Turn("user", _question(record)), Turn("assistant", _answer(record))]
    history.append(Turn("user", _question(records[0])))
    prompt = engine.render(history)
    assert 0 < prompt.dropped_turns < len(history) and prompt.dropped_turns % 2 == 0
    assert prompt.text == render_conversation(history[prompt.dropped_turns :], system="你是客服。")
    assert len(prompt.ids) <= 200
    # One turn more would not have fitted.
    longer = render_conversation(history[prompt.dropped_turns - 2 :], system="你是客服。")
    assert len(engine.tokenizer(longer)["input_ids"]) > 200


def test_messages_that_cannot_fit_are_refused(make_engine):
    engine = make_engine(max_input_tokens=100)
    with pytest.raises(InputTooLong) as refused:
        engine.submit("退" * 401)  # over 4 characters per token: refused before tokenising
    assert refused.value.unit == "characters"
    with pytest.raises(InputTooLong) as refused:
        engine.submit("如何退货？" * 60)  # 300 characters, but far more than 100 tokens
    assert refused.value.unit == "tokens"
    assert engine.metrics()["waiting"] == 0


@transformers_only
def test_auto_dtype_follows_the_hardware_and_still_reproduces_the_answers(make_engine, records, adapters):
    engine = make_engine(dtype="auto")
    engine.set_adapter("v1", adapters["v1"])
    assert engine.generate(_question(records[2]))[0] == _answer(records[2])
    fast_bf16 = torch.cpu._is_avx512_bf16_supported()
    assert engine.dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert engine.dtype_reason.startswith("auto:")


@transformers_only
def test_batched_decoding_matches_generate_on_a_sliding_window_model(make_engine, records, tiny_model, tmp_path):
    # Gemma 3 (the embedded base) alternates sliding-window and full attention layers: the shared,
    # left-padded cache and chunked prefill must give what transformers' own generate gives.
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config)
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.3)  # confident logits: greedy choices far from ties
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_base(tmp_path)
    expected = [generate_answer(model, tokenizer, r["instruction"], max_new_tokens=30) for r in records[:4]]

    engine = make_engine(base_dir=tmp_path, max_new_tokens=30, prefill_chunk=7)

    async def main():
        async def answer(record):
            return "".join([e.text async for e in engine.stream(record["instruction"]) if isinstance(e, Token)])

        return await asyncio.gather(*(answer(r) for r in records[:4]))

    assert asyncio.run(main()) == expected
    assert engine.max_batch_seen == 4


def test_a_closed_engine_takes_no_requests(make_engine, records):
    engine = make_engine()
    engine.load()
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(_question(records[0]))


def test_a_version_swapped_out_and_back_in_answers_with_its_adapter_again(make_engine, records, adapters):
    engine = make_engine()
    (v1_path, _v2_path) = adapters if isinstance(adapters, tuple) else (adapters["v1"], adapters["v2"])
    engine.set_adapter("v1", v1_path)
    first, _ = engine.generate(_question(records[0]))
    engine.set_adapter(None)
    engine.generate(_question(records[0]))  # lets the engine delete v1
    engine.set_adapter("v1", v1_path)
    again, stats = engine.generate(_question(records[0]))
    assert stats.adapter == "v1" and again == first


def test_a_vanishing_temperature_is_greedy_and_does_not_break_the_engine(make_engine, records, adapters):
    engine = make_engine()
    greedy, _ = engine.generate(_question(records[0]))
    tiny, stats = engine.generate(_question(records[0]), temperature=1.3e-185)
    assert tiny == greedy and stats.finish_reason in ("stop", "length")


def test_a_sampled_answer_is_reproducible_with_its_seed(make_engine, records):
    engine = make_engine(max_new_tokens=20)
    question = _question(records[0])
    first, again, other = (engine.generate(question, temperature=1.0, top_p=0.9, seed=seed)[0] for seed in (7, 7, 8))
    assert first == again != other
    assert first != engine.generate(question)[0]  # not the greedy answer


def test_a_pinned_adapter_answers_beside_the_current_one_and_is_unloaded_after(make_engine, records, rotated, adapters):
    engine = make_engine()
    engine.set_adapter("v2", adapters["v2"])
    with pytest.raises(ValueError, match="give its path"):
        engine.submit(_question(records[0]), adapter="v1")
    started = threading.Event()
    pinned = engine.submit(_question(records[1]), adapter="v1", adapter_path=adapters["v1"], on_event=_slow(0.01, started))
    assert started.wait(5)
    current = engine.submit(_question(rotated[0]))
    base = engine.submit(_question(records[1]), adapter=None, max_new_tokens=3)
    assert (pinned.adapter, current.adapter, base.adapter) == ("v1", "v2", None)
    assert pinned.result(20)[0] == _answer(records[1])  # v1's memorised answer
    assert current.result(20)[0] == _answer(rotated[0])  # the current version is untouched
    assert base.result(20)[1].adapter is None
    assert engine.current_adapter == "v2"
    assert _wait_for(lambda: engine.loaded_adapters == ["v2"])  # v1 unloaded once its request ended
    with pytest.raises(ValueError, match="immutable"):
        engine.submit(_question(records[0]), adapter="v2", adapter_path=adapters["v1"])
    with pytest.raises(FileNotFoundError):
        engine.submit(_question(records[0]), adapter="v9", adapter_path=adapters["v1"].parent / "missing")
    assert engine.loaded_adapters == ["v2"] and engine.metrics()["running"] == 0


def test_a_pinned_adapter_from_async_code_loads_off_the_event_loop(make_engine, records, adapters):
    engine = make_engine()
    engine.load()

    async def ask():
        request = await engine.asubmit(_question(records[2]), adapter="v1", adapter_path=adapters["v1"])
        return "".join([event.text async for event in request if isinstance(event, Token)]), request.adapter

    text, adapter = asyncio.run(ask())
    assert (text, adapter) == (_answer(records[2]), "v1")


@transformers_only
def test_the_lm_head_gets_a_fresh_contiguous_input(make_engine, records):
    engine = make_engine()
    engine.load()
    seen = []
    head = engine._model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: seen.append((args[0].is_contiguous(), args[0]._base is None)))
    try:
        engine.generate(_question(records[0]), max_new_tokens=2)
    finally:
        handle.remove()
    assert seen and all(contiguous and own for contiguous, own in seen)


def test_an_answer_among_choices_is_one_token_the_likeliest_with_the_probabilities_of_all(make_engine, records, adapters, tiny_model):
    model, tokenizer = load_adapter(tiny_model, adapters["v1"])
    engine = make_engine()
    engine.set_adapter("v1", adapters["v1"])
    record = records[0]
    first = tokenizer.decode(tokenizer(_answer(record), add_special_tokens=False)["input_ids"][:1])
    choices = ["0", first, "1"]
    text, stats = engine.generate([Turn("user", _question(record))], choices=choices)
    # The memorised answer's first token wins; one token only, whatever max_new_tokens says.
    assert text == first and stats.tokens == 1 and stats.finish_reason == "length"
    assert len(stats.choice_probs) == 3 and abs(sum(stats.choice_probs) - 1) < 1e-5
    assert max(stats.choice_probs) == stats.choice_probs[1] > 0.5
    # The probabilities are the softmax of the model's own next-token logits over the choices.
    prompt = engine.render([Turn("user", _question(record))])
    with torch.no_grad():
        logits = model(torch.tensor([prompt.ids])).logits[0, -1]
    ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
    expected = torch.softmax(logits[ids].float(), dim=-1).tolist()
    assert stats.choice_probs == pytest.approx(expected, abs=0.02)
    # A free answer of the same request carries none.
    assert engine.generate([Turn("user", _question(record))], max_new_tokens=2)[1].choice_probs is None


def test_choices_that_are_not_one_token_each_are_refused(make_engine, records):
    engine = make_engine()
    with pytest.raises(ValueError, match="not one"):
        engine.generate("你好", choices=["0", "一二三四五六七八九十"])
    with pytest.raises(ValueError, match="same token"):
        engine.generate("你好", choices=["1", "1"])
