"""Prompt-lookup drafting on the transformers engine: single-stream greedy decode of grounded
prompts with drafts vs without, on Gemma-3-270M.

    .venv/bin/python benchmarks/drafting_transformers.py                      # 6 questions, 96 tokens
    .venv/bin/python benchmarks/drafting_transformers.py --questions 3 --new-tokens 64 --no-adapter

Each prompt is grounded as the chat pipeline sends it: the user turn is
`llm.grounding.grounded_question` over three pairs of data/train.json (the gold pair among its two
neighbours, in a seeded order), asking the gold pair's question (an alternate wording where the
pair has one). The engine serves the quick LoRA adapter of the other benchmarks
(benchmarks/common.py; --no-adapter: the base model), greedy, up to --new-tokens tokens.

Question after question, the two engines alternate (same process, same dtype, same adapter):
  drafting  llm.engine.Engine with draft_tokens=--draft-tokens;
  plain     the same with draft_tokens=0.
"decode tok/s" is tokens after the first / (first to last token), summed over the questions.
Printed besides: the drafts' acceptance rate (draft tokens the model confirmed / verified), tokens
per decode step, and parity: how many answers are token for token the same. In float32 they all
must be; in bfloat16 a near-tie of two logits (a bf16 step apart) may go the other way when the
forward's shape changes, with drafts as with two chats batched together without drafts.

--chats N (N > 1): then N of the prompts start at once on each engine in turn; aggregate tok/s =
tokens of all answers / (start to last answer), the prefill of the N grounded prompts included
(with a few hundred tokens each it can take most of the time). Every row of a step feeds as many
columns as the longest draft, so a batch pays for the padding of the rows that draft less.
"""

import argparse
import random
import time

import common


def grounded_prompts(count, *, seed=7):
    """`count` grounded user turns, each with the curated answer it asks for among its references."""
    from llm.finetune.raft import Reference
    from llm.grounding import grounded_question
    from llm.prompting import question_text

    pairs = common.records()
    rng = random.Random(seed)
    step = max(1, len(pairs) // count)
    prompts = []
    for index in range(count):
        at = index * step
        references = [pairs[at], pairs[(at + 1) % len(pairs)], pairs[at - 1]]
        rng.shuffle(references)
        block = [Reference(question_text(r["instruction"], r.get("input", "")), r["output"]) for r in references]
        gold = pairs[at]
        asked = (gold.get("alternates") or [question_text(gold["instruction"], gold.get("input", ""))])[0]
        prompts.append(grounded_question(asked, block))
    return prompts


def answer(engine, prompt, new_tokens):
    """(token ids, Stats) of one greedy answer."""
    request = engine.submit(prompt, max_new_tokens=new_tokens)
    _, stats = request.result(600)
    return list(request.token_ids), stats


def together(engine, prompts, new_tokens):
    """Aggregate tokens/s of answering `prompts` all at once, prefill included."""
    started = time.perf_counter()
    requests = [engine.submit(prompt, max_new_tokens=new_tokens) for prompt in prompts]
    tokens = sum(request.result(600)[1].tokens for request in requests)
    return tokens / (time.perf_counter() - started)


def main():
    parser = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--questions", type=int, default=6, help="grounded prompts answered (default: %(default)s)")
    parser.add_argument("--draft-tokens", type=int, default=8, help="the drafting engine's draft_tokens (default: %(default)s)")
    parser.add_argument("--no-adapter", action="store_true", help="serve the base model, no LoRA")
    parser.add_argument("--chats", type=int, default=1, help="also answer this many prompts at once (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="the engines' dtype (default: %(default)s, bf16 where the CPU has it)")
    args = parser.parse_args()

    import torch

    from llm.engine import Engine, EngineConfig

    print(common.cpu_line())
    print(f"torch threads: {torch.get_num_threads()}; {common.load_average()} (a shared machine: other work may run)")
    adapter = None if args.no_adapter else common.quick_adapter(args.base, args.work)
    engines = {}
    for name, draft_tokens in (("plain", 0), ("drafting", args.draft_tokens)):
        engine = Engine(
            EngineConfig(base_dir=args.base, dtype=args.dtype, draft_tokens=draft_tokens, max_new_tokens=args.new_tokens)
        )
        if adapter is not None:
            engine.set_adapter("a", adapter)
        engine.load()
        engines[name] = engine
    print(f"{common.engine_label(engines['plain'])}, adapter: {adapter or 'none'}")

    totals = {name: {"tokens": 0, "decode_tokens": 0, "decode_s": 0.0, "steps": 0} for name in engines}
    same = 0
    prompts = grounded_prompts(args.questions)
    drafting = engines["drafting"]
    drafted_before, accepted_before = drafting.counters.drafted, drafting.counters.draft_accepted
    for prompt in prompts:
        ids = {}
        for name, engine in engines.items():
            steps = engine.decode_steps
            ids[name], stats = answer(engine, prompt, args.new_tokens)
            total = totals[name]
            total["tokens"] += stats.tokens
            total["steps"] += engine.decode_steps - steps
            if stats.tokens > 1:
                total["decode_tokens"] += stats.tokens - 1
                total["decode_s"] += (stats.latency_ms - stats.first_token_ms) / 1000
        same += ids["plain"] == ids["drafting"]
    drafted = drafting.counters.drafted - drafted_before
    accepted = drafting.counters.draft_accepted - accepted_before

    rows = []
    for name, total in totals.items():
        rate = total["decode_tokens"] / total["decode_s"] if total["decode_s"] else 0.0
        rows.append([name, total["tokens"], total["steps"], f"{total['tokens'] / max(total['steps'], 1):.2f}", f"{rate:.1f}"])
    print()
    common.print_table(["engine", "tokens", "decode steps", "tokens/step", "decode tok/s"], rows)
    plain_rate, drafting_rate = (float(row[-1]) for row in rows)
    print()
    print(f"speed-up: {drafting_rate / plain_rate:.2f}x; acceptance: {accepted}/{drafted} draft tokens "
          f"({accepted / max(drafted, 1):.0%}); parity: {same}/{len(prompts)} answers token for token the same")
    if args.chats > 1:
        batch = (prompts * args.chats)[: args.chats]
        rates = {name: together(engine, batch, args.new_tokens) for name, engine in engines.items()}
        print(f"{args.chats} chats at once, aggregate end to end: plain {rates['plain']:.1f} tok/s, "
              f"drafting {rates['drafting']:.1f} tok/s ({rates['drafting'] / rates['plain']:.2f}x)")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
