"""Adapter hot swap: `engine.set_adapter` to another adapter, to the first token from it.

    .venv/bin/python benchmarks/swap.py                        # 4 swaps idle, 4 swaps busy
    .venv/bin/python benchmarks/swap.py --swaps 6 --busy-chats 8

Two quick adapters (benchmarks/common.py trains them once into /tmp/csp-bench, on different
pairs) are activated in turn under a new version name each time, so that every swap reads the
adapter from disk as the activation of a freshly trained version does. Each swap is timed from
the `set_adapter(name, path)` call to the first token of a new chat, which must be answered by
the new version (its Done stats name it):

  idle   nothing else is running;
  busy   --busy-chats answers are streaming on the previous version during the swap (they must
         finish on it), so the new chat's prefill joins a running, now mixed-adapter batch.

For reference the script also times a plain first token without a swap (same question, the
engine idle), so "swap cost" = activation-to-first-token minus that.

Target (issue): activation to the first token from the new version <= 1 s.
"""

import argparse
import asyncio
import time

import common


async def swap_once(engine, name, path, question, new_tokens, busy_questions):
    """(set_adapter s, activation -> first token s, every answer on the right adapter, previous name)."""
    from llm.engine import Done, Token

    previous = engine.current_adapter
    # The busy chats run 4x longer than the swapped-in answer: they are still going when it starts.
    background = [asyncio.create_task(common.engine_stream(engine, q, 4 * new_tokens)) for q in busy_questions]
    if busy_questions:  # wait until they are all decoding, not just queued
        steps = engine.decode_steps
        while engine.metrics()["running"] < len(busy_questions) or engine.decode_steps < steps + 3:
            await asyncio.sleep(0.01)
    started = time.perf_counter()
    await asyncio.to_thread(engine.set_adapter, name, path)
    loaded = time.perf_counter()
    first, stats = None, None
    async for event in engine.stream(question, max_new_tokens=new_tokens):
        if isinstance(event, Token) and first is None:
            first = time.perf_counter()
        elif isinstance(event, Done):
            stats = event.stats
    old = await asyncio.gather(*background)
    right = stats.adapter == name and all(r.finish_reason in ("length", "stop") and r.adapter == previous for r in old)
    return loaded - started, first - started, right, previous


async def plain_first_token(engine, question, new_tokens):
    """Stream call to the first Token, as a swap's first token is timed."""
    timed = await common.engine_stream(engine, question, new_tokens)
    return timed.arrivals[0] if timed.arrivals else timed.total_s


async def run(engine, adapters, args):
    question = common.questions(1, offset=20)[0]
    busy_questions = common.questions(args.busy_chats, offset=30)
    version = 0
    results = {"idle": [], "busy": []}
    plain = []
    for scenario, others in (("idle", []), ("busy", busy_questions)):
        for _ in range(args.swaps):
            plain.append(await plain_first_token(engine, question, args.new_tokens))
            version += 1
            name, path = f"v{version}", adapters[version % 2]
            set_s, first_s, right, previous = await swap_once(engine, name, path, question, args.new_tokens, others)
            results[scenario].append((set_s, first_s, right))
            print(
                f"  {scenario}: {previous} -> {name}: set_adapter {set_s * 1000:.0f} ms, first token from {name} at "
                f"{first_s * 1000:.0f} ms{'' if right else '  (WRONG ADAPTER or old answers failed)'}; loaded now {engine.loaded_adapters}",
                flush=True,
            )
    return results, plain


def main():
    parser = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]), new_tokens=16)
    parser.add_argument("--swaps", type=int, default=4, help="swaps per scenario (default: %(default)s)")
    parser.add_argument("--busy-chats", type=int, default=4, help="answers streaming during a busy swap (default: %(default)s)")
    common.add_backend_arguments(parser)
    args = parser.parse_args()

    import torch

    from llm.engine import Engine, EngineConfig, LlamaCppEngine

    if args.backend == "both":
        parser.error("swap.py measures one backend per run")
    print(f"swap.py: backend {args.backend}, {args.swaps} swaps idle and busy ({args.busy_chats} chats); {common.load_average()}; torch threads {torch.get_num_threads()}")
    adapters = [
        common.quick_adapter(args.base, args.work, name="a"),
        common.quick_adapter(args.base, args.work, name="b", offset=8, seed=2),
    ]
    engine_class = LlamaCppEngine if args.backend == "llamacpp" else Engine
    engine = engine_class(
        EngineConfig(base_dir=args.base, max_active=16, max_new_tokens=max(256, 8 * args.new_tokens), max_seconds=1800, threads=args.threads)
    )
    for adapter in adapters:  # llama.cpp needs each adapter's GGUF LoRA: written once, before timing
        common.ensure_lora_gguf(engine, adapter)
    engine.set_adapter("v0", adapters[0])
    engine.load()
    common.engine_generate(engine, common.questions(1)[0], 8)  # warm-up
    results, plain = asyncio.run(run(engine, adapters, args))

    plain_ms = common.median(plain) * 1000
    rows = []
    for scenario, runs in results.items():
        if not runs:
            continue
        set_ms = [r[0] * 1000 for r in runs]
        first_ms = [r[1] * 1000 for r in runs]
        rows.append([
            scenario, len(runs), f"{common.median(set_ms):.0f}", f"{common.median(first_ms):.0f}", f"{max(first_ms):.0f}",
            f"{common.median(first_ms) - plain_ms:.0f}", "yes" if all(r[2] for r in runs) else "NO",
        ])
    print()
    common.print_table(["scenario", "swaps", "set_adapter ms (median)", "activation -> first token ms (median)", "max ms", "minus plain first token", "right adapter"], rows)
    print()
    print(f"plain first token (no swap, idle): median {plain_ms:.0f} ms")
    for scenario, runs in results.items():
        worst = max(r[1] for r in runs)
        median = common.median([r[1] for r in runs])
        print(f"{scenario}: activation -> first token median {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms (target <= 1 s: {'met' if worst <= 1 else 'median met, worst MISSED' if median <= 1 else 'MISSED'})")
    print(f"after: {common.load_average()}")
    engine.close()


if __name__ == "__main__":
    main()
