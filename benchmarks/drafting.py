"""Prompt-lookup drafting on grounded answers: llama.cpp engine decode with drafts vs without, vs
raw llama-cpp-python's plain decode of the same GGUF, then aggregate tok/s at 1..16 chats.

    .venv/bin/python benchmarks/drafting.py                                   # 6 questions, levels 1,2,4,8,16
    .venv/bin/python benchmarks/drafting.py --questions 4 --levels 1,4 --new-tokens 64   # a quicker look
    .venv/bin/python benchmarks/drafting.py --plot benchmarks/drafting.png    # + tok/s against chats

The prompts are grounded as the chat pipeline sends them: the user turn is
`llm.grounding.grounded_question` over three pairs of data/train.json, the gold pair at a seeded
position among two others of the same category, and the question is one of the gold pair's
alternates (a paraphrase the customer could write; data/dev.json is left to the quality
benchmarks). Gemma-3-270M Q4_K_M serves them with the quick LoRA adapter of the other benchmarks
(benchmarks/common.py), greedy, up to --new-tokens tokens an answer.

Single stream, question after question, the three paths alternating on each question:
  drafting  LlamaCppEngine with draft_tokens=--draft-tokens;
  plain     the same engine class and settings with draft_tokens=0;
  raw       llama_cpp.Llama (the high-level API) on the same GGUF with the adapter's GGUF LoRA,
            `generate` greedy from the same prompt ids, as many tokens as the engine's answer.
"decode tok/s" is tokens after the first / (first to last token), summed over the questions.
Printed besides: the drafts' acceptance rate, tokens per decode step, and parity: how many
greedy answers are token for token the same with and without drafting (they must all be).

Verify cost: one llama_decode of the first prompt's next 1, 2, 3, 5, 9 tokens (a last token and
a draft of 0..8) on the same GGUF, threads and extra-buffer rule, logits for every token as a
verify step asks, and for the last only (the forward without Gemma's 262k-row LM head per row):
drafting pays only where feeding 1 + d tokens costs well under 1 + d single steps.

Concurrency: each level starts N chats at once (`engine.stream` from one asyncio loop) on the
drafting and on the plain engine in turn; aggregate = tokens of all chats / (start to last Done).

Targets (issue #14): grounded single-stream decode >= 2x the same engine without drafting, and
above raw llama-cpp-python's plain decode; report the concurrency levels with and without drafts.
"""

import argparse
import asyncio
import random
import sys
import time

import common


def grounded_questions(count, *, seed=7):
    """`count` grounded user turns: (an alternate of a train pair's question with the pair and two
    others of its category as references, the pair's curated answer)."""
    from llm.finetune.raft import Reference
    from llm.grounding import grounded_question
    from llm.prompting import question_text

    pairs = common.records()
    rng = random.Random(seed)
    chosen = [record for record in pairs if record.get("alternates")]
    step = max(1, len(chosen) // count)
    made = []
    for index in range(count):
        gold = chosen[(index * step) % len(chosen)]
        others = [r for r in pairs if r is not gold and r.get("category") == gold.get("category")]
        others = rng.sample(others, 2) if len(others) >= 2 else rng.sample([r for r in pairs if r is not gold], 2)
        references = [gold, *others]
        rng.shuffle(references)
        block = [Reference(question_text(r["instruction"], r.get("input", "")), r["output"]) for r in references]
        alternate = gold["alternates"][index % len(gold["alternates"])]
        made.append((grounded_question(alternate, block), gold["output"].strip()))
    return made


async def answer(engine, question, new_tokens):
    """One streamed answer: (common.Timed, its token ids)."""
    from llm.engine import Token

    started = time.perf_counter()
    request = await engine.asubmit(question, max_new_tokens=new_tokens)
    arrivals = []
    async for event in request:
        if isinstance(event, Token):
            arrivals.append(time.perf_counter() - started)
    stats = request.stats
    timed = common.Timed(
        tokens=stats.tokens, first_s=stats.first_token_ms / 1000 if stats.first_token_ms is not None else None,
        total_s=time.perf_counter() - started, arrivals=arrivals, finish_reason=stats.finish_reason,
    )
    return timed, request.token_ids


def raw_llama(engine, adapter, threads):
    """(llama_cpp.Llama on the engine's GGUF with the adapter's GGUF LoRA, what it applies)."""
    import llama_cpp

    from llm.engine.llamacpp import raw_llama_as_served

    options = dict(
        model_path=str(engine.gguf_path), n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    with raw_llama_as_served():
        try:
            return llama_cpp.Llama(lora_path=str(adapter / "adapter.gguf"), **options), "with the adapter's GGUF LoRA"
        except (ValueError, RuntimeError) as error:
            return llama_cpp.Llama(**options), f"WITHOUT the LoRA (llama_cpp.Llama refused it: {error})"


def raw_generate(llm, ids, count):
    """Greedy `Llama.generate` of exactly `count` tokens after `ids`: (common.Timed, the ids)."""
    llm.reset()
    started = time.perf_counter()
    arrivals, produced = [], []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        arrivals.append(time.perf_counter() - started)
        produced.append(token)
        if len(produced) >= count:
            break
    timed = common.Timed(tokens=len(produced), first_s=arrivals[0], total_s=arrivals[-1], arrivals=arrivals, finish_reason="length")
    return timed, produced


def verify_costs(gguf, ids, threads, *, sizes=(1, 2, 3, 5, 9), repeats=7):
    """{(tokens fed, logits rows): median seconds of one llama_decode after `ids`}, each run's
    cells removed again, as a rejected draft's are."""
    import statistics

    import llama_cpp

    from llm.engine.llamacpp import use_extra_buffers

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = use_extra_buffers("auto")
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = 4096
    context_params.n_batch = context_params.n_ubatch = 512
    context_params.n_threads = context_params.n_threads_batch = threads
    context_params.no_perf = True
    context = llama_cpp.llama_init_from_model(model, context_params)
    memory = llama_cpp.llama_get_memory(context)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(tokens, start, outputs):
        for index, token in enumerate(tokens):
            batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, start + index, 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = index >= len(tokens) - outputs
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(context, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        for start in range(0, len(ids), 512):
            decode(ids[start : start + 512], start, 1)
        costs = {}
        for size in sizes:
            for outputs in dict.fromkeys((size, 1)):
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    decode(ids[-size:], len(ids), outputs)  # any tokens: the cost is the same
                    times.append(time.perf_counter() - started)
                    llama_cpp.llama_memory_seq_rm(memory, 0, len(ids), -1)
                costs[size, outputs] = statistics.median(times)
        return costs
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)


def decode_rate(runs):
    """Tokens after the first / (first to last token), summed over answers."""
    tokens = sum(t.tokens - 1 for t in runs if t.tokens > 1)
    seconds = sum(t.total_s - t.first_s for t in runs if t.tokens > 1)
    return tokens / seconds if seconds else 0.0


def single_stream(drafting, plain, llm, prompts, new_tokens):
    """Each question on the three paths in turn; per path its Timed runs, and the greedy ids."""
    runs = {"drafting": [], "plain": [], "raw": []}
    ids = {"drafting": [], "plain": [], "raw": []}
    before = drafting.metrics()
    for number, (question, _) in enumerate(prompts, 1):
        timed_d, ids_d = asyncio.run(answer(drafting, question, new_tokens))
        timed_p, ids_p = asyncio.run(answer(plain, question, new_tokens))
        timed_r, ids_r = raw_generate(llm, drafting.render(question).ids, max(2, len(ids_p)))
        for path, timed, got in (("drafting", timed_d, ids_d), ("plain", timed_p, ids_p), ("raw", timed_r, ids_r)):
            runs[path].append(timed)
            ids[path].append(got)
        print(
            f"  question {number}: {timed_p.tokens} tokens; decode tok/s drafting {timed_d.decode_tokens_per_s:.1f}, "
            f"plain {timed_p.decode_tokens_per_s:.1f}, raw {timed_r.decode_tokens_per_s:.1f}"
            + ("" if ids_d == ids_p else "  DRAFTED ANSWER DIFFERS"),
            flush=True,
        )
    after = drafting.metrics()
    drafted = after["drafted_tokens"] - before["drafted_tokens"]
    accepted = after["draft_accepted_tokens"] - before["draft_accepted_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    return runs, ids, drafted, accepted, steps


async def level(engine, questions, new_tokens):
    started = time.perf_counter()
    results = await asyncio.gather(*(common.engine_stream(engine, q, new_tokens) for q in questions))
    return results, time.perf_counter() - started


def plot(path, measured, new_tokens):
    """Aggregate tokens/s against concurrent chats, with and without drafting."""
    series = [
        (f"llama.cpp engine, {label}", [(count, tokens / wall) for name, count, tokens, wall, _ in measured if name == label])
        for label in dict.fromkeys(row[0] for row in measured)
    ]
    common.plot_rates(
        path, series, xlabel="concurrent chats (grounded prompts)",
        title=f"Gemma-3-270M Q4_K_M + LoRA, up to {new_tokens} tokens per answer",
    )


def main():
    parser = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]), new_tokens=96)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: 0 = one per core)")
    parser.add_argument("--draft-tokens", type=int, default=8, help="the drafting engine's draft_tokens (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=6, help="grounded questions of the single-stream part (default: %(default)s)")
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent chats per level; empty: none (default: %(default)s)")
    parser.add_argument("--plot", default="", metavar="PNG", help="also draw tokens/s against chats (matplotlib)")
    parser.add_argument("--head-type", default="", help="serve the GGUF with its output layer requantised to this type (CSP_LLAMA_HEAD_TYPE, e.g. q4_0; default: as shipped)")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",") if n]
    if args.plot:
        import matplotlib  # noqa: F401  (before minutes of measuring: benchmarks/requirements.txt has it)

    from llm.engine.llamacpp import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    print(common.cpu_line())
    print(f"CPU flags (llm.engine.llamacpp.cpu_flags): {' '.join(flags)}")
    print(
        f"drafting.py: {args.questions} grounded questions, up to {args.new_tokens} new tokens, draft_tokens "
        f"{args.draft_tokens} vs 0, levels {levels}, output layer {args.head_type or 'as shipped'}; {common.load_average()}",
        flush=True,
    )
    adapter = common.quick_adapter(args.base, args.work, name="a")
    config = dict(
        max_active=max([16, *levels]), max_waiting=32, max_new_tokens=max(256, args.new_tokens), max_seconds=1800,
        threads=args.threads, head_type=args.head_type,
    )
    drafting = common.served_engine("llamacpp", args.base, adapter, draft_tokens=args.draft_tokens, **config)
    plain = common.served_engine("llamacpp", args.base, adapter, draft_tokens=0, **config)
    threads = drafting.metrics()["threads"]
    llm, lora = raw_llama(drafting, adapter, threads)
    pool = grounded_questions(max(args.questions, *levels, 1))
    prompts = pool[: args.questions]
    lengths = [len(drafting.render(q).ids) for q, _ in prompts]
    print(
        f"engine llama.cpp {drafting.metrics()['dtype']} on {threads} threads; raw llama-cpp-python {lora}; "
        f"prompt tokens {min(lengths)}-{max(lengths)} (median {common.median(lengths):.0f})",
        flush=True,
    )

    # warm-up of every path (kernel choice, allocator, the logits buffer's size), not timed
    warm = pool[-1][0]
    for engine in (drafting, plain):
        asyncio.run(answer(engine, warm, 16))
    raw_generate(llm, drafting.render(warm).ids, 8)

    print("\nsingle stream:")
    runs, ids, drafted, accepted, steps = single_stream(drafting, plain, llm, prompts, args.new_tokens)
    rates = {path: decode_rate(timed) for path, timed in runs.items()}
    rows = []
    for path, label in (("drafting", f"engine, draft_tokens={args.draft_tokens}"), ("plain", "engine, draft_tokens=0"), ("raw", f"raw llama-cpp-python, {lora}")):
        timed = runs[path]
        rows.append([
            label, sum(t.tokens for t in timed), f"{common.median([t.first_s for t in timed]) * 1000:.0f}",
            f"{rates[path]:.1f}", f"{rates[path] / rates['plain']:.2f}x",
        ])
    print()
    common.print_table(["path", "tokens", "first token ms (median)", "decode tok/s", "vs plain engine"], rows)
    same = sum(a == b for a, b in zip(ids["drafting"], ids["plain"]))
    same_raw = sum(a == b[: len(a)] for a, b in zip(ids["plain"], ids["raw"]))
    after_first = sum(t.tokens - 1 for t in runs["drafting"] if t.tokens > 1)
    print(
        f"\ndrafts: {accepted}/{drafted} draft tokens accepted ({accepted / drafted if drafted else 0:.0%}); "
        f"{after_first} tokens after the first in {steps} decode steps ({after_first / steps if steps else 0:.2f} a step)"
    )
    print(f"parity: greedy answers identical with and without drafting {same}/{len(prompts)}; raw llama-cpp-python's the same as the engine's {same_raw}/{len(prompts)}")
    speedup, over_raw = rates["drafting"] / rates["plain"], rates["drafting"] / rates["raw"]
    print(
        f"target: drafting >= 2x the plain engine: {speedup:.2f}x ({'met' if speedup >= 2 else 'MISSED'}); "
        f"above raw llama-cpp-python: {over_raw:.2f}x ({'met' if over_raw > 1 else 'MISSED'})",
        flush=True,
    )
    llm.close()

    print("\nverify cost: one llama_decode of 1 + d tokens after the first prompt (median of 7):")
    costs = verify_costs(drafting.gguf_path, drafting.render(prompts[0][0]).ids, threads)
    step = costs[1, 1]
    rows = []
    for (size, outputs), seconds in costs.items():
        rows.append([size, "all" if outputs == size else "last only", f"{seconds * 1000:.1f}", f"{seconds / step:.2f}x", f"{seconds / size * 1000:.1f}"])
    common.print_table(["tokens fed", "logits", "ms", "x one-token step", "ms a token"], rows)
    sys.stdout.flush()

    measured = []
    if levels:
        print("\nconcurrency:")
    for count in levels:
        questions = [q for q, _ in pool[:count]]
        for label, engine in (("drafting", drafting), ("plain", plain)):
            results, wall = asyncio.run(level(engine, questions, args.new_tokens))
            tokens = sum(r.tokens for r in results)
            measured.append((label, count, tokens, wall, results))
            firsts = [r.first_s for r in results if r.first_s is not None]
            print(f"  {label:8s} {count:2d} chats: {tokens / wall:.1f} tok/s aggregate, p95 first token {common.percentile(firsts, 95):.2f} s", flush=True)
    if levels:
        by = {(label, count): tokens / wall for label, count, tokens, wall, _ in measured}
        rows = [
            [count, f"{by['plain', count]:.1f}", f"{by['drafting', count]:.1f}", f"{by['drafting', count] / by['plain', count]:.2f}x",
             f"{by['plain', count] / by['plain', levels[0]]:.2f}x", f"{by['drafting', count] / by['drafting', levels[0]]:.2f}x"]
            for count in levels
        ]
        print()
        common.print_table(["chats", "plain tok/s", "drafting tok/s", "drafting / plain", f"plain vs {levels[0]}", f"drafting vs {levels[0]}"], rows)
    print(f"\nafter: {common.load_average()}")
    if args.plot and measured:
        plot(args.plot, measured, args.new_tokens)
        print(f"plot written to {args.plot}")
    drafting.close()
    plain.close()


if __name__ == "__main__":
    main()
