"""Chats while a run trains on the same machine: first token and decode against an idle machine.

    .venv/bin/python benchmarks/contention.py                    # 8 chats x 64 tokens a phase, ~6 min on 2 cores
    .venv/bin/python benchmarks/contention.py --chats 2 --rate-steps 3 --new-tokens 16   # a quick check that it runs

Issue #14 item 5: the default single-machine install trains and serves on the same cores. Targets,
during a training run: chat first token p95 <= 2x and decode tok/s >= 0.5x the idle figures; and
a run on an idle machine, now that it trains at a lower priority, within 15% of its wall time at
normal priority.

One run, one process serving (this one) and one training process at a time:

  engine   llm.engine.LlamaCppEngine on the embedded Gemma-3-270M with a quick LoRA adapter active
           (benchmarks/common.py), --threads llama.cpp threads (default 0 = one per core, as
           CSP_CHAT_THREADS=0 serves); --chats questions of data/train.json answered one after
           another, --new-tokens each; first token is the engine's own (submission to first token),
           decode is tokens after the first / (first to last token), a median over the chats.
  trainer  a child process running llm.finetune.loop.train_model (the task's trainer, torch's
           default threads, the default LoRA config, one epoch) on data/train.json pairs, inside
           training.priority.Yielding(nice) as the q2 task runs it (Yielding(0) changes nothing).
           By default it starts in its own session, as `manage.py serve` starts qcluster
           (start_new_session): where the kernel groups processes by session (autogroup), that
           decides what a nice value can do. --same-session starts it in this one's.

Phases, in this order (the idle chats twice, first and last, so that drift shows):
  idle          chats, nothing else running;
  train alone   the trainer for --rate-steps steps with no chats, at nice 0 and inside
                Yielding(--nice), --rate-rounds runs of each, alternating (0, N, N, 0): seconds
                per step after the first (the first builds kernels), pooled over the runs; same
                data and seed, so the same batches;
  nice 0        the trainer (--steps at most) at nice 0; once it finished --warm-steps steps the
                chats run, then it is stopped;
  nice N        the same inside Yielding(--nice);
  nice N, same session   (unless --no-same-session-phase) the same, the trainer in this session;
  idle again.

Printed: the CPU flags line, load averages, each phase's first token p50 / p95, decode tok/s (the
median chat) and tokens / seconds over all its chats (end to end: a few stalled chats show there),
their ratios to the idle figures (both idle phases pooled), the CPU shares the engine and the
trainer got during the chats, and the trainer's rate alone at nice 0 and nice N.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# the training process


def thread_nices():
    """The distinct nice values of this process's threads (Yielding renices each thread)."""
    values = set()
    for name in os.listdir("/proc/self/task"):
        try:
            values.add(os.getpriority(os.PRIO_PROCESS, int(name)))
        except OSError:
            continue
    return sorted(values)


def autogroup():
    """This process's autogroup and its nice value ("/autogroup-85 nice 10"), or "" where there is none."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return ""


def trainer_child(spec):
    """Run in the child: train, printing one JSON line per optimizer step on stdout."""
    import torch

    from llm.finetune.config import FinetuneConfig
    from llm.finetune.loop import train_model
    from training.priority import Yielding

    def emit(**event):
        print(json.dumps({"t": time.monotonic(), **event}), flush=True)

    data = common.records()
    records = [data[i % len(data)] for i in range(spec["steps"] * spec["batch_size"])]
    config = FinetuneConfig(epochs=1, batch_size=spec["batch_size"], seed=spec["seed"], checkpoint_every=0, device="cpu")
    emit(event="start", torch_threads=torch.get_num_threads())
    # A trainer in its own session stands for the cluster's (serve starts qcluster so); in this
    # process's session it shares the server's, where Yielding leaves the autogroup alone.
    with Yielding(spec["nice"], own_session=spec["own_session"]):
        _, _, metrics = train_model(
            config, spec["base"], records, [], spec["out"], resume=False,
            on_progress=lambda info: emit(event="step", step=info["step"], nices=thread_nices(), autogroup=autogroup()),
        )
    emit(event="done", tokens_per_s=metrics["tokens_per_s"], steps=metrics["steps"])


class Trainer:
    """The training child process, seen from here: its step times as they arrive."""

    def __init__(self, args, *, nice, steps, own_session, work):
        self.log = Path(work) / f"trainer-nice{nice}-{time.monotonic_ns()}.log"
        spec = {"base": str(args.base), "nice": nice, "steps": steps, "batch_size": args.batch_size, "seed": args.seed,
                "out": str(Path(work) / "run"), "own_session": own_session}
        self.started = time.monotonic()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--trainer-child", json.dumps(spec)],
                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=own_session,
            )
        self.events = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            if line.startswith("{"):
                with self.changed:
                    self.events.append(json.loads(line))
                    self.changed.notify_all()
        with self.changed:
            self.events.append({"event": "exit", "t": time.monotonic()})
            self.changed.notify_all()

    def steps(self):
        return [e for e in self.events if e["event"] == "step"]

    def wait_for(self, condition, timeout):
        with self.changed:
            if not self.changed.wait_for(lambda: condition() or self.exited(), timeout):
                raise TimeoutError("the trainer took too long")
        if self.exited() and not condition():
            sys.exit(f"the trainer ended early (exit status {self.process.wait()}); its log:\n{self.log.read_text()[-3000:]}")

    def exited(self):
        return any(e["event"] == "exit" for e in self.events)

    def cpu_seconds(self):
        """User + system CPU seconds of the child so far (all its threads)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self):
        """SIGINT, as a worker is stopped: Yielding's exit then gives the autogroup its nice value
        back (a killed run would leave it nicer, and a trainer in this session shares this one's)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()
        self.reader.join()

    def done(self):
        return next((e for e in self.events if e["event"] == "done"), None)


def own_cpu_seconds():
    times = os.times()
    return times.user + times.system


# ---------------------------------------------------------------------------------------------
# chats


def chats(engine, questions, new_tokens):
    """The questions answered one after another: [Timed], and the window (start, end) they took."""
    started = time.monotonic()
    answers = [common.engine_generate(engine, question, new_tokens) for question in questions]
    return answers, (started, time.monotonic())


def summary(answers):
    firsts = [a.first_s * 1000 for a in answers]
    return {
        "first_p50": common.percentile(firsts, 50),
        "first_p95": common.percentile(firsts, 95),
        "decode": statistics.median(a.decode_tokens_per_s for a in answers),
        "tokens": sum(a.tokens for a in answers),
        # the whole phase: a few very slow chats hide behind a median
        "overall": sum(a.tokens for a in answers) / sum(a.total_s for a in answers),
    }


def contended(engine, questions, args, *, nice, own_session, work):
    """Chats while the trainer trains: it starts, warms up, the chats run, it is stopped."""
    trainer = Trainer(args, nice=nice, steps=args.steps, own_session=own_session, work=work)
    trainer.wait_for(lambda: len(trainer.steps()) >= args.warm_steps, timeout=args.warm_timeout)
    trainer_cpu, engine_cpu = trainer.cpu_seconds(), own_cpu_seconds()
    answers, (start, end) = chats(engine, questions, args.new_tokens)
    trainer_cpu, engine_cpu = trainer.cpu_seconds() - trainer_cpu, own_cpu_seconds() - engine_cpu
    covered = trainer.process.poll() is None and not trainer.done()
    steps = trainer.steps()
    nices, group = steps[-1]["nices"], steps[-1]["autogroup"]
    trainer.stop()
    during = [s for s in steps if start <= s["t"] <= end]
    window, cores = end - start, os.cpu_count()
    return {
        **summary(answers),
        "covered": covered,
        "trainer_steps_per_s": len(during) / window,
        "trainer_cpu": trainer_cpu / window / cores,
        "engine_cpu": engine_cpu / window / cores,
        "nices": nices,
        "autogroup": group,
        "torch_threads": trainer.events[0].get("torch_threads"),
        "window": window,
    }


def train_alone(args, *, nice, work):
    """The trainer for --rate-steps steps with no chats: seconds per step after the first."""
    trainer = Trainer(args, nice=nice, steps=args.rate_steps, own_session=not args.same_session, work=work)
    trainer.wait_for(lambda: trainer.done() is not None, timeout=args.warm_timeout + 60 * args.rate_steps)
    trainer.stop()
    times = [s["t"] for s in trainer.steps()]
    return {
        "timed_steps": len(times) - 1,
        "timed_s": times[-1] - times[0],
        "first_step_at": times[0] - trainer.started,
        "wall": trainer.done()["t"] - trainer.started,
        "tokens_per_s": trainer.done()["tokens_per_s"],
        "nices": trainer.steps()[-1]["nices"],
    }


def pooled(runs):
    """The train-alone runs of one nice value together: s/step over all their timed steps."""
    return {
        "per_step": sum(r["timed_s"] for r in runs) / sum(r["timed_steps"] for r in runs),
        "each": [r["timed_s"] / r["timed_steps"] for r in runs],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
        "first_step_at": statistics.mean(r["first_step_at"] for r in runs),
        "wall": statistics.mean(r["wall"] for r in runs),
        "nices": sorted({n for r in runs for n in r["nices"]}),
    }


# ---------------------------------------------------------------------------------------------


def main():
    parser = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]), new_tokens=64)
    parser.add_argument("--chats", type=int, default=8, help="chats a phase, one after another (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: 0 = one per core, as CSP_CHAT_THREADS)")
    parser.add_argument("--nice", type=int, default=10, help="Yielding increment of the yielding phases (default: %(default)s, CSP_TRAINING_NICE)")
    parser.add_argument("--steps", type=int, default=300, help="steps the trainer is given while chats run; it is stopped after them (default: %(default)s)")
    parser.add_argument("--warm-steps", type=int, default=1, help="trainer steps done before the chats start (default: %(default)s)")
    parser.add_argument("--rate-steps", type=int, default=8, help="steps of each train-alone phase (default: %(default)s)")
    parser.add_argument("--rate-rounds", type=int, default=2, help="train-alone runs of each nice value, alternating (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="trainer examples a step (default: %(default)s, the task's default)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--warm-timeout", type=float, default=300, help="seconds the trainer may take to its first steps")
    parser.add_argument("--same-session", action="store_true", help="start every trainer in this process's session")
    parser.add_argument("--no-same-session-phase", action="store_true", help="skip the nice-N phase with the trainer in this session")
    parser.add_argument("--trainer-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rate_steps < 2:
        parser.error("--rate-steps must be at least 2 (the first step builds kernels and is not timed)")
    if args.trainer_child:
        trainer_child(json.loads(args.trainer_child))
        return

    print(common.cpu_line())
    try:
        autogroups_on = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        autogroups_on = False
    print(
        f"contention.py: {args.chats} chats x {args.new_tokens} tokens a phase; trainer batch {args.batch_size}, "
        f"{args.rate_rounds} x {args.rate_steps} steps alone at each nice; nice {args.nice}; trainer in {'this' if args.same_session else 'its own'} session; "
        f"kernel autogroup (nice acts within a session only) {'on' if autogroups_on else 'off'}"
    )
    print(f"start: {common.load_average()}", flush=True)
    adapter = common.quick_adapter(args.base, args.work, name="a")
    engine = common.served_engine(
        "llamacpp", args.base, adapter, max_new_tokens=max(256, args.new_tokens), max_seconds=1800, threads=args.threads
    )
    print(f"{common.engine_label(engine)} ({engine.dtype_reason})")
    questions = common.questions(args.chats)
    common.engine_generate(engine, questions[0], 8)  # warm-up: first calls allocate caches

    results, rates = {}, {}
    with tempfile.TemporaryDirectory(prefix="csp-contention-") as work:
        def phase(name, run):
            started = time.monotonic()
            print(f"phase {name} ...", flush=True)
            result = run()
            print(f"  {time.monotonic() - started:.0f} s; {common.load_average()}", flush=True)
            return result

        idle_answers = [phase("idle", lambda: chats(engine, questions, args.new_tokens)[0])]
        # Alternating (0, N, N, 0, ...) so that a drift in the machine's load weighs on both alike.
        for round_ in range(args.rate_rounds):
            for nice in (0, args.nice) if round_ % 2 == 0 else (args.nice, 0):
                run = phase(f"train alone, nice {nice}", lambda: train_alone(args, nice=nice, work=work))
                rates.setdefault(nice, []).append(run)
        contended_phases = [("training, nice 0", 0, not args.same_session), (f"training, nice {args.nice}", args.nice, not args.same_session)]
        if not args.same_session and not args.no_same_session_phase:
            contended_phases.append((f"training, nice {args.nice}, same session", args.nice, False))
        for name, nice, own in contended_phases:
            results[name] = phase(name, lambda: contended(engine, questions, args, nice=nice, own_session=own, work=work))
        idle_answers.append(phase("idle again", lambda: chats(engine, questions, args.new_tokens)[0]))
    engine.close()

    idle = summary(idle_answers[0] + idle_answers[1])
    first_idle, last_idle = summary(idle_answers[0]), summary(idle_answers[1])
    print()
    rows = [
        [title, f"{r['first_p50']:.0f}", f"{r['first_p95']:.0f}", f"{r['decode']:.1f}", f"{r['overall']:.1f}", *ratios, "", "", ""]
        for title, r, ratios in [
            ("idle (first)", first_idle, ["", ""]), ("idle (last)", last_idle, ["", ""]), ("idle (both, the reference)", idle, ["1.00x", "1.00x"])
        ]
    ]
    for name, r in results.items():
        p95_ratio, decode_ratio = r["first_p95"] / idle["first_p95"], r["decode"] / idle["decode"]
        rows.append([
            name + ("" if r["covered"] else " (trainer ended early!)"),
            f"{r['first_p50']:.0f}",
            f"{r['first_p95']:.0f}",
            f"{r['decode']:.1f}",
            f"{r['overall']:.1f}",
            f"{p95_ratio:.2f}x {'met' if p95_ratio <= 2 else 'MISSED'}",
            f"{decode_ratio:.2f}x {'met' if decode_ratio >= 0.5 else 'MISSED'}",
            f"{r['engine_cpu']:.0%}",
            f"{r['trainer_cpu']:.0%}",
            f"{r['trainer_steps_per_s'] * 60:.1f}",
        ])
    common.print_table(
        ["phase", "first token p50 ms", "p95 ms", "decode tok/s (median)", "tok/s, all chats", "p95 x idle (<= 2x)", "decode x idle (>= 0.5x)",
         "engine CPU", "trainer CPU", "trainer steps/min"],
        rows,
    )
    for name, r in results.items():
        print(
            f"  {name}: trainer on {r['torch_threads']} torch threads at nice {r['nices']}, in {r['autogroup'] or 'no autogroup'}; "
            f"chats took {r['window']:.0f} s; this process in {autogroup() or 'no autogroup'}"
        )

    print()
    alone = [pooled(rates[0]), pooled(rates[args.nice])]
    common.print_table(
        ["trainer alone", "s/step (steps 2+)", "each run", "tokens/s (all steps)", "first step done at s", "process wall s", "threads' nice"],
        [[f"nice {nice}", f"{r['per_step']:.2f}", " ".join(f"{x:.2f}" for x in r["each"]), f"{r['tokens_per_s']:.0f}",
          f"{r['first_step_at']:.1f}", f"{r['wall']:.1f}", str(r["nices"])]
         for nice, r in zip((0, args.nice), alone)],
    )
    slower = alone[1]["per_step"] / alone[0]["per_step"]
    print(
        f"  nice {args.nice} / nice 0 time per step: {slower:.2f}x (target: an idle machine's run within 15%: "
        f"{'met' if slower <= 1.15 else 'MISSED'}); whole process {alone[1]['wall'] / alone[0]['wall']:.2f}x"
    )
    print(f"end: {common.load_average()}")


if __name__ == "__main__":
    main()
