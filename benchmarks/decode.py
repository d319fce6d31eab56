"""Single-stream decode speed: the chat engine vs plain `model.generate` in fp32, adapter active.

    .venv/bin/python benchmarks/decode.py                     # 64 new tokens, 3 rounds, transformers engine
    .venv/bin/python benchmarks/decode.py --new-tokens 128 --rounds 5 --profile
    .venv/bin/python benchmarks/decode.py --backend both --parity 20   # + llama.cpp, and their agreement

Both answer the same Chinese question from data/train.json with the same quick LoRA adapter
(benchmarks/common.py trains it once into /tmp/csp-bench), greedy, batch 1:

  baseline  base + adapter through PEFT in fp32, `model.generate`, EOS ignored (min_new_tokens)
            so that it produces exactly --new-tokens tokens;
  engine    the chat engine of --backend (transformers: llm.engine.Engine, its own dtype choice;
            llamacpp: llm.engine.LlamaCppEngine on the base model's GGUF with the adapter's GGUF
            LoRA, --threads threads; max_active=16) streaming the answer with
            max_new_tokens=--new-tokens; the question is one the under-trained adapter answers at
            length, and the script says so if the engine stopped early (counts are then per token).

Rounds alternate baseline / engine(s) so that all see the same machine load; medians are printed.
"end to end" is tokens / (call to last token), prefill included; "decode" is tokens after the
first / (first to last token), the steady rate the bandwidth ceiling bounds.

Ceiling: weight bytes read per decode step / measured copy bandwidth. Every weight is read once
per step (the tied 262k x 640 embedding once, as the LM head; the embedding lookup reads one row),
LoRA weights included; the KV cache (a few MB) is left out. For llama.cpp the weights are the
GGUF's tensors (`llama_model_size`, quantised) plus the GGUF LoRA. Copy bandwidth is STREAM's
"copy": bytes read + bytes written per second of a large `dst.copy_(src)`.

--parity N (with --backend both): an adapter trained on the first N pairs (about 75 optimizer steps,
trained once and reused) answers those N questions greedily on both backends; printed: identical answers, answers with the same numbers
(the key facts: amounts, days, hours), and token-level agreement. Target (issue #7): same key
facts on >= 95% of the questions.

Targets (issue): engine >= 2.5x the baseline, and >= 70% of the ceiling.
"""

import argparse
import math
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


def parity(engines, args):
    """Greedy answers of both backends to the questions their adapter was trained on."""
    # About 75 optimizer steps (batch 4), as the default config takes on 100 pairs in 3 epochs: enough
    # for the adapter to answer its questions and end its turn, which an under-trained one never does.
    epochs = max(3, math.ceil(75 / math.ceil(args.parity / 4)))
    adapter = common.quick_adapter(args.base, args.work, name="parity", pairs=args.parity, epochs=epochs)
    asked = common.questions(args.parity)
    trained = [record["output"].strip() for record in common.records()[: args.parity]]
    answers = []
    for engine in engines:
        common.serve_adapter(engine, "parity", adapter)
        answers.append([engine.generate(question, max_new_tokens=256, temperature=0)[0] for question in asked])
    result = common.agreement(answers[0], answers[1], engines[0].tokenizer)
    count = result["answers"]
    print(f"\nparity on {count} trained questions ({engines[0].backend} vs {engines[1].backend}, greedy, same adapter, {epochs} epochs):")
    for engine, given in zip(engines, answers):
        print(f"  {engine.backend} gives the trained answer to {sum(a == b for a, b in zip(given, trained))}/{count}")
    for question, a, b in zip(asked, *answers):
        if a != b:
            print(f"  differs: {question!r}\n    {engines[0].backend}: {a!r}\n    {engines[1].backend}: {b!r}")
    print(
        f"  identical answers {result['same_text']}/{count}, same key facts (numbers) {result['same_facts']}/{count} "
        f"(target >= 95%: {'met' if result['same_facts'] >= 0.95 * count else 'MISSED'}), "
        f"token-level agreement {result['token_agreement']:.1%}"
    )


def main():
    parser = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]), new_tokens=64)
    common.add_backend_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/engine rounds (default: %(default)s)")
    parser.add_argument("--question", type=int, default=0, help="index of the question in data/train.json")
    parser.add_argument("--profile", action="store_true", help="also print a torch profiler summary of one transformers engine answer")
    parser.add_argument("--parity", type=int, default=0, metavar="N", help="with --backend both: answer agreement on N trained questions")
    args = parser.parse_args()

    import torch

    backends = common.chosen_backends(args.backend)
    print(
        f"decode.py: {args.new_tokens} new tokens, {args.rounds} rounds, backends {', '.join(backends)}; "
        f"{common.load_average()}; torch threads {torch.get_num_threads()}"
    )
    adapter = common.quick_adapter(args.base, args.work, name="a")
    question = common.questions(1, offset=args.question)[0]

    config = dict(max_active=16, max_new_tokens=max(256, args.new_tokens), max_seconds=1800, threads=args.threads)
    engines = [common.served_engine(backend, args.base, adapter, **config) for backend in backends]
    model, tokenizer = common.hf_model(args.base, adapter)
    ids = engines[0].render(question).ids
    print(f"question: {question!r} ({len(ids)} prompt tokens)")
    for engine in engines:
        print(f"  {common.engine_label(engine)} ({engine.dtype_reason}; backend: {engine.backend_reason or 'chosen here'})")

    # warm-up: first calls allocate caches and pick kernels
    common.hf_generate(model, tokenizer, ids, 8)
    for engine in engines:
        common.engine_generate(engine, question, 8)

    baseline, served = [], {id(engine): [] for engine in engines}
    for round_ in range(args.rounds):
        baseline.append(common.hf_generate(model, tokenizer, ids, args.new_tokens))
        line = f"  round {round_ + 1}: baseline {baseline[-1].decode_tokens_per_s:.1f} tok/s"
        for engine in engines:
            timed = common.engine_generate(engine, question, args.new_tokens)
            served[id(engine)].append(timed)
            line += f", {engine.backend} {timed.decode_tokens_per_s:.1f} tok/s ({timed.tokens} tokens, {timed.finish_reason})"
        print(line, flush=True)
    for engine in engines:
        early = [t for t in served[id(engine)] if t.finish_reason != "length"]
        if early:
            print(f"NOTE: the {engine.backend} engine stopped before {args.new_tokens} tokens in {len(early)} round(s); rates are per token generated")

    bandwidth = copy_bandwidth()
    base_bytes, base_lora = weight_bytes(model)

    def med(runs, attribute):
        return common.median([getattr(t, attribute) for t in runs])

    measured = [("HF generate fp32 (baseline)", baseline, bandwidth / base_bytes, None)]
    for engine in engines:
        engine_bytes, engine_lora = engine.weight_bytes() if engine.backend == "llamacpp" else weight_bytes(engine.model)
        measured.append((common.engine_label(engine), served[id(engine)], bandwidth / engine_bytes, (engine, engine_bytes, engine_lora)))
    rows = []
    for label, runs, ceil, _ in measured:
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

    print()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    print(f"weights read per step: baseline {base_bytes / 1e6:.0f} MB (LoRA {base_lora / 1e6:.1f} MB)")
    for label, runs, ceiling, (engine, engine_bytes, engine_lora) in measured[1:]:
        print(f"{label}: weights read per step {engine_bytes / 1e6:.0f} MB (LoRA {engine_lora / 1e6:.1f} MB)")
        step_s = 1 / med(runs, "decode_tokens_per_s")
        if engine.backend == "transformers":
            head_s, head_rate = head_gemv(engine.model)
            print(
                f"  LM head GEMV alone: {head_s * 1000:.1f} ms = {head_s / step_s:.0%} of a decode step "
                f"({step_s * 1000:.0f} ms), reading at {head_rate / 1e9:.1f} GB/s"
            )
        speedup_e2e = med(runs, "tokens_per_s") / med(baseline, "tokens_per_s")
        speedup_decode = med(runs, "decode_tokens_per_s") / med(baseline, "decode_tokens_per_s")
        fraction = med(runs, "decode_tokens_per_s") / ceiling
        print(f"  speedup / baseline: end to end {speedup_e2e:.2f}x, decode {speedup_decode:.2f}x   (target >= 2.5x: {'met' if speedup_e2e >= 2.5 else 'MISSED'})")
        print(f"  decode at {fraction:.0%} of its bandwidth ceiling {ceiling:.1f} tok/s   (target >= 70%: {'met' if fraction >= 0.7 else 'MISSED'})")
        print(
            f"  (were the bandwidth counted as bytes copied only, {bandwidth / 2e9:.1f} GB/s, the ceiling would be "
            f"{ceiling / 2:.1f} tok/s and the engine at {2 * fraction:.0%})"
        )
    if len(engines) == 2 and len(served[id(engines[0])]) and len(served[id(engines[1])]):
        ratio = med(served[id(engines[1])], "decode_tokens_per_s") / med(served[id(engines[0])], "decode_tokens_per_s")
        print(f"{engines[1].backend} / {engines[0].backend} decode: {ratio:.2f}x")
    print(f"after: {common.load_average()}")

    if args.parity:
        if len(engines) == 2:
            parity(engines, args)
        else:
            print("--parity needs --backend both")
    if args.profile:
        for engine in engines:
            if engine.backend == "transformers":
                print("\nprofile of one transformers engine answer (all threads), top ops by self CPU time:")
                timed = common.profiled(lambda: common.engine_generate(engine, question, args.new_tokens))
                print(f"({timed.tokens} tokens in {timed.total_s:.2f} s, first token at {timed.first_s * 1000:.0f} ms)")
    for engine in engines:
        engine.close()


if __name__ == "__main__":
    main()
