"""Shared pieces of the serving benchmarks (not a script: the others import it).

    from common import add_arguments, quick_adapter, questions, hf_generate, engine_stream   # in benchmarks/*.py

What they share: the embedded Gemma-3-270M base, quick LoRA adapters trained once on a few pairs
of data/train.json and reused from /tmp (decode speed does not depend on how well an adapter is
trained, only on the LoRA layers being in the forward), Chinese questions from the same file,
a timed fp32 `model.generate` baseline and a timed engine stream, the engine of either backend
(`--backend transformers | llamacpp | both`), answer agreement between two backends, a table
printer and the chart of aggregate tokens/s against concurrent chats.

Every benchmark measures everything it compares in one run and prints ratios: the machines are
shared and noisy, so numbers from another run are never comparable.
"""

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from tests.support.stats import percentile  # noqa: E402,F401 (the benchmarks call common.percentile)

DEFAULT_BASE = ROOT / "var" / "models" / "gemma-3-270m"
DEFAULT_WORK = Path("/tmp/csp-bench")
TRAIN_JSON = ROOT / "data" / "train.json"


def add_arguments(parser: argparse.ArgumentParser, *, new_tokens=96):
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base model directory (default: %(default)s)")
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="where quick adapters are trained and reused (default: %(default)s)"
    )
    parser.add_argument("--new-tokens", type=int, default=new_tokens, help="tokens generated per answer (default: %(default)s)")
    return parser


BACKENDS = ("transformers", "llamacpp")


def add_backend_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--backend", choices=[*BACKENDS, "both"], default="transformers",
        help="engine backend to measure; both = each in turn, same questions and adapter (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: 0 = one per core)")
    return parser


def chosen_backends(choice):
    return list(BACKENDS) if choice == "both" else [choice]


def cpu_line():
    """The CPU, its core count and the instructions the kernels care about: print it with every table
    (llama.cpp and bf16 figures halve on a machine without AVX-512)."""
    name, flags = platform.processor() or "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return f"CPU: {name}, {os.cpu_count()} cores; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}"


def load_average():
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------
# data and adapters


def records():
    return json.loads(TRAIN_JSON.read_text(encoding="utf-8"))


def questions(count, *, offset=0):
    """`count` customer questions (instruction + input) from data/train.json, cycling if needed."""
    from llm.prompting import question_text

    pairs = records()
    return [question_text(r["instruction"], r.get("input", "")) for r in (pairs[(offset + i) % len(pairs)] for i in range(count))]


def quick_adapter(base_dir, work_dir, *, name="a", pairs=8, offset=0, seed=1, epochs=1):
    """Path of a LoRA adapter (all linear layers, the default config) trained `epochs` on `pairs`
    records of data/train.json; trained once (tens of seconds on 2 cores per epoch), then reused.

    With one epoch it is deliberately under-trained: enough to give non-zero LoRA weights and run
    PEFT's LoRA path in every forward, little enough that the model still answers at length, so
    that answers of a fixed number of tokens can be timed. More epochs make it answer the trained
    questions (the parity check of decode.py).
    """
    from llm.finetune.config import FinetuneConfig
    from llm.finetune.loop import train

    chosen = records()[offset : offset + pairs]
    config = FinetuneConfig(epochs=epochs, batch_size=4, seed=seed, checkpoint_every=0)
    key = hashlib.sha256(
        json.dumps([str(Path(base_dir).resolve()), chosen, config.to_dict()], ensure_ascii=False).encode()
    ).hexdigest()[:12]
    out_dir = Path(work_dir) / "adapters" / f"{name}-{key}"
    adapter = out_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        started = time.monotonic()
        print(f"training quick adapter {name!r} on {len(chosen)} pairs into {out_dir} ...", flush=True)
        train(config, base_dir, chosen, [], out_dir, resume=False)
        print(f"  done in {time.monotonic() - started:.0f} s", flush=True)
    return adapter


def served_engine(backend, base_dir, adapter, **config):
    """A loaded engine of `backend` serving `adapter` as version "a". For llama.cpp the adapter's
    GGUF LoRA is written first (once; beside the adapter, where the platform keeps it)."""
    from llm.engine import Engine, EngineConfig, LlamaCppEngine

    engine_class = LlamaCppEngine if backend == "llamacpp" else Engine
    engine = engine_class(EngineConfig(base_dir=base_dir, **config))
    serve_adapter(engine, "a", adapter)
    engine.load()
    return engine


def ensure_lora_gguf(engine, adapter):
    """Write the adapter's GGUF LoRA (once, beside it) when the engine is llama.cpp's."""
    if engine.backend == "llamacpp" and not (Path(adapter) / "adapter.gguf").is_file():
        from llm.gguf import write_lora_gguf

        write_lora_gguf(adapter, base_dir=engine.config.base_dir)


def serve_adapter(engine, name, adapter):
    """engine.set_adapter(name, adapter), writing the GGUF LoRA first where llama.cpp needs it."""
    ensure_lora_gguf(engine, adapter)
    engine.set_adapter(name, adapter)


def engine_label(engine):
    return f"engine {engine.backend} {engine.metrics()['dtype']}"


def agreement(reference, other, tokenizer):
    """How far two lists of answers agree: identical texts, same numbers (the key facts of a
    customer-service answer: amounts, days, hours) in the same order, and token-level agreement
    (position by position, over the longer answer of each pair)."""
    import re

    number = re.compile(r"\d+(?:\.\d+)?")
    same_tokens = total_tokens = 0
    for a, b in zip(reference, other):
        ids_a, ids_b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (a, b))
        same_tokens += sum(x == y for x, y in zip(ids_a, ids_b))
        total_tokens += max(len(ids_a), len(ids_b))
    return {
        "answers": len(reference),
        "same_text": sum(a == b for a, b in zip(reference, other)),
        "same_facts": sum(number.findall(a) == number.findall(b) for a, b in zip(reference, other)),
        "token_agreement": same_tokens / total_tokens if total_tokens else 1.0,
    }


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timed:
    """One generated answer: tokens and when each arrived (seconds after the call started)."""

    tokens: int = 0
    first_s: float | None = None
    total_s: float = 0.0
    arrivals: list = field(default_factory=list)
    finish_reason: str = ""
    adapter: str | None = None  # the engine's answers: the adapter version that answered

    @property
    def tokens_per_s(self):
        """End to end: tokens / (call to last token), prefill included."""
        return self.tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self):
        """Steady decode: tokens after the first / (first token to last token)."""
        if self.tokens < 2 or self.first_s is None:
            return 0.0
        return (self.tokens - 1) / (self.total_s - self.first_s)


def hf_model(base_dir, adapter_dir):
    """The plain baseline: base + adapter through PEFT in fp32, on the CPU, as `load_adapter` gives it."""
    from llm.finetune.config import FinetuneConfig
    from llm.modeling import load_adapter

    model, tokenizer = load_adapter(base_dir, adapter_dir, FinetuneConfig(device="cpu"))
    return model, tokenizer


def hf_generate(model, tokenizer, ids, new_tokens):
    """Greedy `model.generate`, batch 1, exactly `new_tokens` tokens (EOS ignored via min_new_tokens)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.calls = 0
            self.times = []

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first put() is the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    input_ids = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=clock,
            use_cache=True,
        )
    ended = time.perf_counter()
    count = output.shape[1] - len(ids)
    arrivals = [t - started for t in clock.times]
    return Timed(tokens=count, first_s=arrivals[0] if arrivals else None, total_s=ended - started, arrivals=arrivals, finish_reason="length")


async def engine_stream(engine, question, new_tokens, **options):
    """Stream one answer from the engine; Timed with the Token arrival times (a Token may carry
    more than one token id when a character spans several: counts come from Done's stats)."""
    from llm.engine import Done, Token

    started = time.perf_counter()
    arrivals, stats = [], None
    async for event in engine.stream(question, max_new_tokens=new_tokens, **options):
        if isinstance(event, Token):
            arrivals.append(time.perf_counter() - started)
        elif isinstance(event, Done):
            stats = event.stats
    total = time.perf_counter() - started
    first = stats.first_token_ms / 1000 if stats.first_token_ms is not None else (arrivals[0] if arrivals else None)
    return Timed(tokens=stats.tokens, first_s=first, total_s=total, arrivals=arrivals, finish_reason=stats.finish_reason, adapter=stats.adapter)


def engine_generate(engine, question, new_tokens, **options):
    """engine_stream from synchronous code."""
    return asyncio.run(engine_stream(engine, question, new_tokens, **options))


def profiled(run, *, rows=14):
    """Call run() under the torch profiler (all threads: the engine decodes on its own) and print
    the ops that took the most self CPU time, by input shape; returns run()'s result."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, experimental_config=config) as prof:
        result = run()
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=36, max_shapes_column_width=56
    )
    # Keep the name, self CPU %, self CPU, calls and shapes columns: the full table is too wide.
    for line in table.splitlines():
        print(line[:66] + line[108:] if len(line) > 108 else line)
    sys.stdout.flush()
    return result


def median(values):
    return statistics.median(values)


def print_table(headers, rows):
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()


def plot_rates(path, series, *, xlabel, title, reference=None):
    """Draw aggregate tokens/s against concurrent chats (log2 x axis) into the PNG `path`.

    `series` is a list of (label, [(chats, tokens_per_s), ...]), one line each; `reference` an
    optional (label, tokens_per_s) drawn as a dashed horizontal line (a sequential baseline).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4))
    for label, points in series:
        axes.plot([c for c, _ in points], [r for _, r in points], marker="o", label=label)
    if reference is not None:
        label, value = reference
        axes.axhline(value, linestyle="--", color="grey", label=label)
    axes.set_xscale("log", base=2)
    counts = sorted({count for _, points in series for count, _ in points})
    axes.set_xticks(counts, [str(c) for c in counts])
    axes.set_xlabel(xlabel)
    axes.set_ylabel("aggregate tokens/s")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
