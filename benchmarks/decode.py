"""Single-stream decode speed: the chat engine vs plain `model.generate` in fp32, adapter active.

    .venv/bin/python benchmarks/decode.py                     # 64 new tokens, 3 rounds
    .venv/bin/python benchmarks/decode.py --new-tokens 128 --rounds 5 --profile

Both answer the same Chinese question from data/train.json with the same quick LoRA adapter
(benchmarks/common.py trains it once into /tmp/csp-bench), greedy, batch 1:

  baseline  base + adapter through PEFT in fp32, `model.generate`, EOS ignored (min_new_tokens)
            so that it produces exactly --new-tokens tokens;
  engine    chat.engine.Engine (its own dtype choice, max_active=16) streaming the answer with
            max_new_tokens=--new-tokens; the question is one the under-trained adapter answers at
            length, and the script says so if the engine stopped early (counts are then per token).

Rounds alternate baseline / engine so that both see the same machine load; medians are printed.
"end to end" is tokens / (call to last token), prefill included; "decode" is tokens after the
first / (first to last token), the steady rate the bandwidth ceiling bounds.

Ceiling: weight bytes read per decode step / measured copy bandwidth. Every weight is read once
per step (the tied 262k x 640 embedding once, as the LM head; the embedding lookup reads one row),
LoRA weights included; the KV cache (a few MB) is left out. Copy bandwidth is STREAM's "copy":
bytes read + bytes written per second of a large `dst.copy_(src)`.

Targets (issue): engine >= 2.5x the baseline, and >= 70% of the ceiling.
"""

import argparse
import time

import common


def copy_bandwidth(megabytes=512, repeats=7):
    """Best STREAM-copy bandwidth (bytes read + written per second) of a large torch copy."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / best


def head_gemv(model, repeats=10):
    """Best time of the LM head alone on one row (what every decode step computes), and its GB/s."""
    import torch

    weight = model.get_output_embeddings().weight
    row = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            torch.nn.functional.linear(row, weight)
            best = min(best, time.perf_counter() - started)
    return best, weight.numel() * weight.element_size() / best


def weight_bytes(model):
    """Bytes of every distinct parameter (tied weights counted once) and of its LoRA part."""
    total = lora = 0
    for name, param in model.named_parameters(remove_duplicate=True):
        size = param.numel() * param.element_size()
        total += size
        if "lora_" in name:
            lora += size
    return total, lora


def main():
    parser = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]), new_tokens=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/engine rounds (default: %(default)s)")
    parser.add_argument("--question", type=int, default=0, help="index of the question in data/train.json")
    parser.add_argument("--profile", action="store_true", help="also print a torch profiler summary of one engine answer")
    args = parser.parse_args()

    import torch

    from chat.engine import Engine, EngineConfig

    print(f"decode.py: {args.new_tokens} new tokens, {args.rounds} rounds; {common.load_average()}; torch threads {torch.get_num_threads()}")
    adapter = common.quick_adapter(args.base, args.work, name="a")
    question = common.questions(1, offset=args.question)[0]

    engine = Engine(EngineConfig(base_dir=args.base, max_active=16, max_new_tokens=max(256, args.new_tokens), max_seconds=1800))
    engine.set_adapter("a", adapter)
    engine.load()
    model, tokenizer = common.hf_model(args.base, adapter)
    ids = engine.render(question).ids
    print(f"question: {question!r} ({len(ids)} prompt tokens); engine dtype {engine.metrics()['dtype']} ({engine.dtype_reason})")

    # warm-up: first calls allocate caches and pick kernels
    common.hf_generate(model, tokenizer, ids, 8)
    common.engine_generate(engine, question, 8)

    baseline, served = [], []
    for round_ in range(args.rounds):
        baseline.append(common.hf_generate(model, tokenizer, ids, args.new_tokens))
        served.append(common.engine_generate(engine, question, args.new_tokens))
        print(
            f"  round {round_ + 1}: baseline {baseline[-1].decode_tokens_per_s:.1f} tok/s, "
            f"engine {served[-1].decode_tokens_per_s:.1f} tok/s ({served[-1].tokens} tokens, {served[-1].finish_reason})",
            flush=True,
        )
    early = [t for t in served if t.finish_reason != "length"]
    if early:
        print(f"NOTE: the engine stopped before {args.new_tokens} tokens in {len(early)} round(s); rates are per token generated")

    bandwidth = copy_bandwidth()
    head_s, head_rate = head_gemv(engine._model)
    engine_bytes, engine_lora = weight_bytes(engine._model)  # the engine's model with LoRA layers injected
    base_bytes, base_lora = weight_bytes(model)
    ceiling = bandwidth / engine_bytes
    baseline_ceiling = bandwidth / base_bytes

    def med(runs, attribute):
        return common.median([getattr(t, attribute) for t in runs])

    rows = []
    for label, runs, ceil in (("HF generate fp32 (baseline)", baseline, baseline_ceiling), (f"engine {engine.metrics()['dtype']}", served, ceiling)):
        rows.append([
            label,
            round(med(runs, "tokens")),
            f"{med(runs, 'first_s') * 1000:.0f}",
            f"{med(runs, 'tokens_per_s'):.1f}",
            f"{med(runs, 'decode_tokens_per_s'):.1f}",
            f"{ceil:.1f}",
            f"{med(runs, 'decode_tokens_per_s') / ceil:.0%}",
        ])
    print()
    common.print_table(["path", "tokens", "first token ms", "end-to-end tok/s", "decode tok/s", "ceiling tok/s", "of ceiling"], rows)

    speedup_e2e = med(served, "tokens_per_s") / med(baseline, "tokens_per_s")
    speedup_decode = med(served, "decode_tokens_per_s") / med(baseline, "decode_tokens_per_s")
    fraction = med(served, "decode_tokens_per_s") / ceiling
    print()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    print(f"weights read per step: engine {engine_bytes / 1e6:.0f} MB (LoRA {engine_lora / 1e6:.1f} MB), baseline {base_bytes / 1e6:.0f} MB (LoRA {base_lora / 1e6:.1f} MB)")
    step_s = 1 / med(served, "decode_tokens_per_s")
    print(
        f"engine LM head GEMV alone: {head_s * 1000:.1f} ms = {head_s / step_s:.0%} of an engine decode step "
        f"({step_s * 1000:.0f} ms), reading at {head_rate / 1e9:.1f} GB/s"
    )
    print(f"speedup engine / baseline: end to end {speedup_e2e:.2f}x, decode {speedup_decode:.2f}x   (target >= 2.5x: {'met' if speedup_e2e >= 2.5 else 'MISSED'})")
    print(f"engine decode at {fraction:.0%} of its bandwidth ceiling {ceiling:.1f} tok/s   (target >= 70%: {'met' if fraction >= 0.7 else 'MISSED'})")
    print(
        f"  (were the bandwidth counted as bytes copied only, {bandwidth / 2e9:.1f} GB/s, the ceiling would be "
        f"{ceiling / 2:.1f} tok/s and the engine at {2 * fraction:.0%})"
    )
    print(f"after: {common.load_average()}")

    if args.profile:
        print("\nprofile of one engine answer (all threads), top ops by self CPU time:")
        timed = common.profiled(lambda: common.engine_generate(engine, question, args.new_tokens))
        print(f"({timed.tokens} tokens in {timed.total_s:.2f} s, first token at {timed.first_s * 1000:.0f} ms)")
    engine.close()


if __name__ == "__main__":
    main()
