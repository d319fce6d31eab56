"""Training throughput: the platform's LoRA trainer against a plain HF `Trainer` + PEFT baseline.

    .venv/bin/python benchmarks/train_throughput.py --steps 20
    .venv/bin/python benchmarks/train_throughput.py --steps 20 --baseline-order same --json /tmp/train.json

Both sides train the same base model (default: the embedded Gemma-3-270M in var/models) on the
same examples of data/train.json with the same LoRA (r=8, alpha=32, dropout 0.05, all linear
layers), learning rate, linear schedule, batch size, clipping and number of optimizer steps, one
after the other in this one process. The platform runs `llm.finetune.loop.train_model` as the
training task does; the baseline is what a user would write with transformers: an fp32 model,
`get_peft_model`, `DataCollatorForSeq2Seq` (dynamic padding) and `Trainer`.

The baseline trains twice by default: once on the platform's own length-grouped batches in the
same order, so that the per-step losses can be compared line by line and the ratio is compute
alone; once on Trainer's default random batches, which pad more (what a user of Trainer gets).
`--baseline-order same` or `shuffled` runs only one of them.

Printed: real (non-padding) tokens/s after the first step (warm-up) and over all steps, ratios,
losses (final, and per step side by side), and the platform's achieved FLOP rate against a bf16
matmul peak measured at the start. About 4 minutes for 20 steps on two quiet cores. The machine
is shared: the share of the CPUs that other processes took during each run is printed, and a
run where it is high is not worth reading; repeat it.
"""

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm.finetune.config import FinetuneConfig  # noqa: E402
from llm.finetune.data import IGNORE_INDEX, encode_example, length_grouped_batches  # noqa: E402
from llm.finetune.loop import train_model  # noqa: E402

DEFAULT_MODEL = ROOT / "var" / "models" / "gemma-3-270m"
DEFAULT_DATA = ROOT / "data" / "train.json"


# ---------------------------------------------------------------------------------------------
# the machine


class OtherCpu:
    """Share of all CPUs that other processes took between marks (from /proc; Linux only).

    The machines are shared; a step during which someone else ran a test suite is not a
    measurement of this code. Each step gets its share, so that noisy steps can be set aside.
    """

    def __init__(self):
        self.last = self._sample()

    def mark(self):
        now = self._sample()
        share, self.last = self._share(self.last, now), now
        return share

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields), int(stat[11]) + int(stat[12])  # busy, all, this process

    @staticmethod
    def _share(before, after):
        if not before or not after or after[1] == before[1]:
            return 0.0
        busy, total, mine = (b - a for a, b in zip(before, after))
        return max(0.0, (busy - mine) / total)


def matmul_peak(dtype, n=2048, repeats=5, rounds=3):
    """Best GFLOP/s of an n x n x n matmul in `dtype` on the threads torch uses now."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN picks and builds its kernel on the first call
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# FLOPs


def model_shape(model):
    """What the FLOP count needs, read from the trained PEFT model's modules and config."""
    from peft.tuners.lora import LoraLayer

    config = model.config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    linear = lora = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            linear += base.in_features * base.out_features
            lora += sum(module.r[name] * (base.in_features + base.out_features) for name in module.lora_A)
    return {
        "linear": linear,  # frozen decoder matmul weights (q, k, v, o, gate, up, down of every layer)
        "lora": lora,  # trainable A and B weights
        "head": config.vocab_size * hidden,  # the LM head (tied to the embedding: frozen)
        "attention": config.num_hidden_layers * heads * head_dim,  # per (query, key) pair
    }


def training_flops(shape, lengths, answers):
    """Matmul FLOPs one optimizer step executes on real tokens, fwd + bwd (a LoRA-aware 6N).

    The textbook 6 x params x tokens assumes every weight gets a gradient: 2 FLOPs per weight per
    token forward, 2 for the gradient w.r.t. the input and 2 for the gradient w.r.t. the weight.
    Here the base weights are frozen, so their weight-gradient matmul is never run: 4 x linear
    params per token. The LoRA weights do get all three: 6 x lora params. The LM head (vocab x
    hidden) runs only at answer positions, forward and input-gradient: 4 x head params per answer
    token. Causal attention adds QK^T and AV over the l(l+1)/2 (query, key) pairs of a sequence
    of length l: 2 x 2 FLOPs per pair per head dim forward, twice that backward. Elementwise work
    (norms, activations, softmax, dropout, casts) is not counted: it is overhead, not model FLOPs.
    Padding is not counted either. (The first layer skips a few input gradients: ~0.3% over.)
    """
    flops = 0
    for length, answer in zip(lengths, answers):
        flops += length * (4 * shape["linear"] + 6 * shape["lora"])
        flops += 3 * 4 * shape["attention"] * length * (length + 1) / 2
        flops += answer * 4 * shape["head"]
    return flops


def six_n_flops(shape, tokens):
    """The rule of thumb 6 x all path params x tokens, head at every token: overcounts here."""
    return 6 * (shape["linear"] + shape["lora"] + shape["head"]) * tokens


# ---------------------------------------------------------------------------------------------
# the two trainers


def platform_run(args, records, work):
    config = FinetuneConfig(
        lora_r=8,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        epochs=1,
        max_length=args.max_length,
        seed=args.seed,
        device="cpu",
    )
    events, others = [], []
    meter = OtherCpu()

    def on_progress(info):
        others.append(meter.mark())
        events.append(info)

    model, _, metrics = train_model(config, args.model, records, [], work, on_progress=on_progress, resume=False)
    elapsed = [e["elapsed_s"] for e in events]
    shape = model_shape(model)
    del model
    gc.collect()
    return {
        "losses": [e["loss"] for e in events],
        "seconds": [b - a for a, b in zip([0.0] + elapsed, elapsed)],
        "other_cpu": others,  # the first also covers loading: it is not used
        "metrics": metrics,
        "shape": shape,
    }


def baseline_run(args, examples, tokenizer, work, order):
    """Plain transformers + PEFT: fp32 weights, DataCollatorForSeq2Seq, Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    torch.manual_seed(args.seed)  # the same LoRA A init as the platform's (it seeds, then adds LoRA)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    tokenizer.padding_side = "right"  # Gemma's tokenizer pads left (for generation); training pads right

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    batches = []  # (real tokens, padded tokens, answer tokens) of each batch, in the order Trainer asks

    def counting_collator(features):
        batch = collator(features)
        mask = batch["attention_mask"]
        batches.append((int(mask.sum()), mask.numel(), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())))
        return batch

    class Recorder(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.others = [], [], []

        def on_train_begin(self, *_, **__):
            self.start, self.meter = time.perf_counter(), OtherCpu()

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            self.others.append(self.meter.mark())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    recorder = Recorder()
    training_args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=int(args.steps * FinetuneConfig.warmup_ratio),  # the platform's rounding
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        bf16=args.baseline_bf16,
        train_sampling_strategy="sequential" if order == "same" else "random",
    )
    dataset = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]} for e in examples]
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=counting_collator, callbacks=[recorder])
    trainer.remove_callback(PrinterCallback)  # the per-step dicts; the table below has them
    trainer.train()
    ends = recorder.ends
    del trainer, model
    gc.collect()
    return {
        "losses": recorder.losses,
        "seconds": [b - a for a, b in zip([recorder.start] + ends, ends)],
        "batches": batches[: len(ends)],
        "other_cpu": recorder.others,
    }


# ---------------------------------------------------------------------------------------------
# report


def print_table(headers, rows):
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()


def rate(tokens, seconds):
    return sum(tokens) / sum(seconds) if sum(seconds) else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="base model directory (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca-format JSON (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps each (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--baseline-order",
        choices=("same", "shuffled", "both"),
        default="both",
        help="baseline batches: the platform's in its order, Trainer's random sampler, or a run of each (default)",
    )
    parser.add_argument("--baseline-bf16", action="store_true", help="give the baseline bf16 autocast (TrainingArguments.bf16)")
    parser.add_argument(
        "--quiet", type=float, default=0.1, help="a step is quiet when others took less than this share of the CPUs (default: %(default)s)"
    )
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    # Enough records for exactly `steps` full batches in one epoch (cycled when the file is short).
    data = json.loads(args.data.read_text(encoding="utf-8"))
    records = [data[i % len(data)] for i in range(args.steps * args.batch_size)]
    config = FinetuneConfig(batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    examples = [e for e in (encode_example(tokenizer, r, config) for r in records) if e is not None]
    lengths = [len(e["input_ids"]) for e in examples]
    answer_counts = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples]
    # The batches train_model will make (epoch 0), so that a baseline can get the very same ones.
    batches = length_grouped_batches(lengths, args.batch_size, args.seed)
    if len(batches) != args.steps or any(len(b) != args.batch_size for b in batches):
        sys.exit(f"{len(examples)} usable examples do not make {args.steps} full batches of {args.batch_size}")
    real = [sum(lengths[i] for i in b) for b in batches]
    padded = [len(b) * max(lengths[i] for i in b) for b in batches]
    answers = [sum(answer_counts[i] for i in b) for b in batches]
    orders = ["same", "shuffled"] if args.baseline_order == "both" else [args.baseline_order]

    print(
        f"model {args.model}  |  {args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, "
        f"{torch.get_num_threads()} threads  |  load average {os.getloadavg()[0]:.2f}"
    )
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"matmul peak here: bf16 {peak_bf16:.0f} GFLOP/s, fp32 {peak_fp32:.0f} GFLOP/s")

    baselines = {}
    with tempfile.TemporaryDirectory(prefix="csp-train-bench-") as work:
        print("training: platform (llm.finetune.loop.train_model) ...", flush=True)
        platform = platform_run(args, records, Path(work) / "platform")
        for order in orders:
            print(f"training: HF Trainer + PEFT baseline ({order} batches) ...", flush=True)
            feed = [examples[i] for b in batches for i in b] if order == "same" else examples
            baselines[order] = baseline_run(args, feed, tokenizer, Path(work) / f"baseline-{order}", order)

    steps = args.steps
    for name, run in [("platform", platform), *baselines.items()]:
        if len(run["losses"]) != steps or len(run["seconds"]) != steps:
            sys.exit(f"{name}: expected {steps} steps, got {len(run['losses'])} losses and {len(run['seconds'])} times")
    if "same" in baselines and [b[0] for b in baselines["same"]["batches"]] != real:
        sys.exit("the baseline did not get the platform's batches; the per-step comparison would be meaningless")

    # One column per run: per-step real and padded tokens, seconds, others' CPU share, losses.
    columns = [{"name": "platform", "real": real, "padded": padded, **platform}]
    for order, run in baselines.items():
        name = "HF, same batches" if order == "same" else "HF, random batches"
        columns.append({"name": name, "real": [b[0] for b in run["batches"]], "padded": [b[1] for b in run["batches"]], **run})
    steady = range(1, steps)  # the first step builds kernels and caches: warm-up, not throughput
    for c in columns:
        c["quiet"] = [i for i in steady if c["other_cpu"][i] < args.quiet]
        c["rate"] = rate([c["real"][i] for i in steady], [c["seconds"][i] for i in steady])
        c["rate_all"] = rate(c["real"], c["seconds"])
        c["rate_quiet"] = rate([c["real"][i] for i in c["quiet"]], [c["seconds"][i] for i in c["quiet"]])
    first = columns[0]

    def quiet_ratio(c):
        """platform / c on quiet steps; for the same batches only steps quiet in both runs, pairwise."""
        if c["name"] == "HF, same batches":
            both = sorted(set(first["quiet"]) & set(c["quiet"]))
            if not both:
                return "no quiet steps"
            return f"{sum(c['seconds'][i] for i in both) / sum(first['seconds'][i] for i in both):.2f}x ({len(both)} paired)"
        return f"{first['rate_quiet'] / c['rate_quiet']:.2f}x" if c["rate_quiet"] and first["rate_quiet"] else "no quiet steps"

    def row(title, cell, ratio=None):
        return [title, *(cell(c) for c in columns), *((ratio(c) if ratio else "") for c in columns[1:])]

    shape = platform["shape"]
    flops = [training_flops(shape, [lengths[i] for i in b], [answer_counts[i] for i in b]) for b in batches]
    achieved = sum(flops[i] for i in steady) / sum(first["seconds"][i] for i in steady) / 1e9
    achieved_quiet = (
        sum(flops[i] for i in first["quiet"]) / sum(first["seconds"][i] for i in first["quiet"]) / 1e9 if first["quiet"] else 0.0
    )
    convention = six_n_flops(shape, sum(real[i] for i in steady)) / sum(first["seconds"][i] for i in steady) / 1e9
    metrics = platform["metrics"]
    tail = min(5, steps)
    quiet_title = f"real tokens/s, quiet steps (others < {args.quiet:.0%} CPU)"

    print()
    print_table(
        ["", *(c["name"] for c in columns), *(f"platform / {c['name']}" for c in columns[1:])],
        [
            row(f"real tokens/s, steps 2-{steps}", lambda c: f"{c['rate']:.1f}", lambda c: f"{first['rate'] / c['rate']:.2f}x"),
            row(quiet_title, lambda c: f"{c['rate_quiet']:.1f} ({len(c['quiet'])} steps)", quiet_ratio),
            row("real tokens/s, all steps", lambda c: f"{c['rate_all']:.1f}", lambda c: f"{first['rate_all'] / c['rate_all']:.2f}x"),
            row("median step (s)", lambda c: f"{statistics.median(c['seconds']):.2f}"),
            row("padding (share of batch tokens)", lambda c: f"{1 - sum(c['real']) / sum(c['padded']):.1%}"),
            row(f"loss at step {steps}", lambda c: f"{c['losses'][-1]:.4f}"),
            row(f"mean loss, last {tail} steps", lambda c: f"{statistics.mean(c['losses'][-tail:]):.4f}"),
            row("mean loss, all steps", lambda c: f"{statistics.mean(c['losses']):.4f}"),
            row("CPU others took, mean over steps 2-" + str(steps), lambda c: f"{statistics.mean(c['other_cpu'][1:]):.0%}"),
        ],
    )
    print(
        f"\nplatform: {metrics['base_dtype']} base weights + fp32 LoRA, bf16 autocast {'on' if metrics['bf16'] else 'off'}, "
        + ("LM head on answer rows only, fused with the loss" if metrics["answer_only_head"] else "LM head at every position")
    )
    print("baseline: fp32 weights, bf16 autocast " + ("on" if args.baseline_bf16 else "off") + ", LM head at every position")
    print(
        f"\nplatform FLOP rate, steps 2-{steps}: {achieved:.0f} GFLOP/s = {achieved / peak_bf16:.0%} of the bf16 matmul peak "
        f"measured above ({peak_bf16:.0f}); on its quiet steps {achieved_quiet:.0f} GFLOP/s = {achieved_quiet / peak_bf16:.0%}"
    )
    print(f"  {sum(flops) / steps / 1e9:.0f} GFLOP per step on average, counted by training_flops() in this script")
    print(
        f"  the 6 x params x tokens rule of thumb would say {convention:.0f} GFLOP/s = {convention / peak_bf16:.0%}: it counts "
        "weight gradients the frozen base never computes, and the LM head at every token"
    )
    print(
        f"  parameters: decoder linear {shape['linear'] / 1e6:.1f}M (frozen), LoRA {shape['lora'] / 1e6:.2f}M (trained), "
        f"LM head {shape['head'] / 1e6:.1f}M (frozen; run at {sum(answers) / sum(real):.0%} of the real tokens, the answers)"
    )

    print()
    headers = ["step", "real tokens", "answer tokens", "platform loss"]
    if "same" in baselines:
        headers += ["HF loss, same batches", "diff"]
    if "shuffled" in baselines:
        headers += ["HF loss, random batches"]
    headers += [f"{c['name']}: s (others' CPU)" for c in columns]
    rows = []
    for i in range(steps):
        cells = [i + 1, real[i], answers[i], f"{platform['losses'][i]:.4f}"]
        if "same" in baselines:
            same = baselines["same"]["losses"][i]
            cells += [f"{same:.4f}", f"{platform['losses'][i] - same:+.4f}"]
        if "shuffled" in baselines:
            cells += [f"{baselines['shuffled']['losses'][i]:.4f}"]
        rows.append(cells + [f"{c['seconds'][i]:.2f} ({c['other_cpu'][i]:.0%})" for c in columns])
    print_table(headers, rows)
    noisy = [c["name"] for c in columns if len(c["quiet"]) < len(steady) / 2]
    if noisy:
        print(f"\nnote: other processes were busy during most steps of {', '.join(noisy)}; repeat when the machine is quieter")

    if args.json:
        summary = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "peak_gflops": {"bf16": peak_bf16, "fp32": peak_fp32},
            "batches": {"real": real, "padded": padded, "answers": answers},
            "runs": columns,
            "gflops": {"platform": achieved, "platform_quiet": achieved_quiet, "six_n_rule_of_thumb": convention, "per_step": flops},
        }
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
