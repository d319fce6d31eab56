"""Stress scenarios of issue #6, full size, against a live daphne this script starts.

    .venv/bin/python benchmarks/stress.py                         # `make stress`: tiny model, about 5 minutes
    .venv/bin/python benchmarks/stress.py --duration 30 --backend llamacpp
    .venv/bin/python benchmarks/stress.py --base var/models/gemma-3-270m --only load,activation

Setup: a throwaway SQLite database in a temporary CSP_DATA_DIR (migrated here), the model of
--base (default: the tiny test model, built once into --work, so the server and not the model is
under test) with two LoRA adapters trained once into --work: v1 active, v2 ready to activate.
Each scenario starts its own `daphne csplatform.asgi:application` (tests.support.livetest) with the
keepalive options `manage.py serve` passes, and drives it over real websockets with the clients of
tests.support.wsload (the same ones tests/test_load.py runs scaled down):

  flood       one client sends garbage and messages at --flood-rate frames/s for --flood-seconds
              (reconnecting whenever it is closed); polite customers' first-token p95 alone vs
              during the flood, measured in alternating blocks. Pass: every garbage frame got its
              error frame, no crash, the flooder was rate-limited and closed, p95 rises < 20%.
  load        --chats customers chat for --duration s, a busy reply retried after retry_after.
              Pass: every message got `start` or `busy` within 1 s, 0 silent hangs, 0 errors,
              and afterwards every answer row is finished and max_active + max_waiting new chats
              at once are all accepted (the engine's queues drained).
  idle        --idle sockets that go silent after the handshake, plus a dead peer (sends a
              message, then never reads), plus one healthy idle customer who answers pings, with
              daphne's default keepalive (CSP_WS_PING_INTERVAL / CSP_WS_PING_TIMEOUT). Pass: the
              silent ones are dropped within interval + timeout + 5 s, the healthy one still
              chats, server RSS after a second round is within 20 MB of after the first.
  activation  --activation-chats customers chat while v2 is activated halfway. Pass: 0 errors,
              every answer ends on the version it started with, chats started before are v1,
              after the activation (+1 s) v2, and some answers were in flight across it.

Prints one Markdown table: scenario | figure | pass/fail.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

SCENARIOS = ("flood", "load", "idle", "activation")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["transformers", "llamacpp"], default="transformers")
    parser.add_argument("--duration", type=float, default=60, help="seconds of the 200-chat load (default: %(default)s)")
    parser.add_argument("--base", default="tiny", help="base model directory, or `tiny` for the test model (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/csp-bench/stress"), help="tiny model and adapters, reused")
    parser.add_argument("--new-tokens", type=int, default=32, help="CSP_CHAT_MAX_NEW_TOKENS of the server (default: %(default)s)")
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--flood-rate", type=float, default=1000)
    parser.add_argument("--flood-seconds", type=float, default=20, help="seconds of flooding in all (default: %(default)s)")
    parser.add_argument("--idle", type=int, default=1000, help="silent sockets (default: %(default)s)")
    parser.add_argument("--activation-chats", type=int, default=20)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of: " + ", ".join(SCENARIOS))
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------
# setup: database, model, adapters


def setup_django():
    data_dir = tempfile.mkdtemp(prefix="csp-stress-")
    os.environ.update(CSP_DATA_DIR=data_dir, DATABASE_URL=f"sqlite:///{data_dir}/db.sqlite3", DJANGO_SETTINGS_MODULE="csplatform.settings")
    os.environ.pop("REDIS_URL", None)  # the embedded defaults: in-memory channel layer, local cache
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return Path(data_dir)


def prepare_model(args):
    """(base dir, v1 adapter dir, v2 adapter dir), trained once into --work and reused."""
    from django.conf import settings

    from llm.finetune.config import FinetuneConfig
    from llm.finetune.loop import train
    from llm.gguf import write_lora_gguf
    from llm.tinymodel import build_tiny_model

    pairs = json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))
    work = args.work / args.base.replace("/", "_")
    if args.base == "tiny":
        base = work / "model"
        if not (base / "config.json").is_file():
            texts = [text for path in settings.CSP_SAMPLE_DATA for r in json.loads(path.read_text(encoding="utf-8")) for text in (r["instruction"], r["output"])]
            build_tiny_model(texts, base, gguf=True)
    else:
        base = Path(args.base).resolve()
    adapters = []
    configs = {  # v1 answers its questions, v2 barely trained: the two versions answer differently
        "v1": FinetuneConfig(lora_r=16, lora_alpha=32, learning_rate=1e-2 if args.base == "tiny" else 5e-4, epochs=30 if args.base == "tiny" else 2, batch_size=4, checkpoint_every=0),
        "v2": FinetuneConfig(epochs=1, learning_rate=1e-3, batch_size=4, checkpoint_every=0),
    }
    for name, config in configs.items():
        out = work / name
        if not (out / "adapter" / "adapter_config.json").is_file():
            print(f"training adapter {name} into {out} ...", flush=True)
            train(config, base, pairs[:6], [], out, resume=False)
        if args.backend == "llamacpp" and not (out / "adapter" / "adapter.gguf").is_file():
            write_lora_gguf(out / "adapter", base_dir=base)
        adapters.append(out / "adapter")
    return base, *adapters


def make_versions(base_dir, v1_dir, v2_dir):
    from training.tests.factories import make_adapter_version, make_base_model, make_run, make_snapshot

    base, snapshot = make_base_model("stress", base_dir), make_snapshot()
    return [
        make_adapter_version(name, path=path, run=make_run(base_model=base, snapshot=snapshot), is_active=name == "v1")
        for name, path in (("v1", v1_dir), ("v2", v2_dir))  # a version per training run
    ]


def session_cookie():
    from django.contrib.sessions.backends.db import SessionStore

    session = SessionStore()
    session.create()
    return f"sessionid={session.session_key}"


class Server:
    """A live daphne for one scenario, with the keepalive options `manage.py serve` passes."""

    def __init__(self, args, data_dir, base_dir, name, **env):
        from csplatform.management.commands.serve import daphne_ping_args

        self.log = data_dir / f"{name}.log"
        self.env = {
            "CSP_DATA_DIR": str(data_dir), "CSP_BASE_MODEL": str(base_dir), "CSP_INFERENCE_BACKEND": args.backend,
            "CSP_CHAT_DEVICE": "cpu", "CSP_CHAT_MAX_NEW_TOKENS": str(args.new_tokens), **env,
        }
        self.daphne_args = daphne_ping_args()

    def __enter__(self):
        from tests.support.livetest import live_daphne

        self.context = live_daphne(env=self.env, log=self.log, daphne_args=self.daphne_args)
        self.url = self.context.__enter__()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc):
        self.context.__exit__(*exc)

    @property
    def pid(self):
        import psutil

        return next(c.pid for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == self.port and c.status == psutil.CONN_LISTEN)

    def crashes(self):
        return self.log.read_text().count("Exception inside application")

    def warm_up(self, question, cookie):
        from tests.support.wsload import ChatClient

        client = ChatClient(self.url, cookie=cookie)
        try:
            assert client.ask(question, hang_after=300).done is not None, "the warm-up message got no answer"
        finally:
            client.close()


# ---------------------------------------------------------------------------------------------
# scenarios: each returns (scenario, figure, passed)


def run_flood(args, data_dir, base_dir, questions, cookie):
    from tests.support import wsload

    with Server(args, data_dir, base_dir, "flood") as server:
        server.warm_up(questions[0], cookie)
        replies = wsload.garbage_replies(server.url, cookie=cookie)
        garbage_ok = replies == [expected for _, expected in wsload.GARBAGE]
        blocks = 4
        # Each block: polite customers alone, then during flood-seconds / blocks of flooding.
        per_block = max(4, int(args.flood_seconds / blocks / 0.25))
        wsload.first_token_times(server.url, questions[:3], cookie=cookie)
        polite = [questions[i % len(questions)] for i in range(per_block)]
        outcome = wsload.flood_against_polite(server.url, questions=polite, rate=args.flood_rate, blocks=blocks, cookie=cookie)
        crashes = server.crashes()
    from chat.consumers import CLOSE_POLICY_VIOLATION

    closed = outcome.total("closes", CLOSE_POLICY_VIOLATION)
    passed = garbage_ok and crashes == 0 and outcome.total("replies", "rate_limited") > 0 and closed > 0 and outcome.rise < 0.2
    figure = f"{sum(r == e for r, (_, e) in zip(replies, wsload.GARBAGE))}/{len(wsload.GARBAGE)} garbage frames answered; " + outcome.summary()
    return f"11 garbage + {args.flood_rate:.0f} msg/s flood", figure + f"; {crashes} crashes", passed


def run_load(args, data_dir, base_dir, questions, cookie):
    from django.conf import settings

    from chat.models import Message
    from tests.support import wsload

    wsload.free_socket_budget(2 * args.chats + 200)
    with Server(args, data_dir, base_dir, "load") as server:
        server.warm_up(questions[0], cookie)
        report = wsload.chat_load(server.url, chats=args.chats, duration=args.duration, questions=questions, cookie=cookie)
        unfinished = Message.objects.filter(role="assistant", finish_reason="").count()
        capacity = settings.CSP_CHAT_MAX_ACTIVE + settings.CSP_CHAT_MAX_WAITING
        probe = wsload.chat_load(server.url, chats=capacity, duration=60, turns=1, questions=questions, cookie=cookie)
        crashes = server.crashes()
    slow = report.replies_slower_than(1.0)
    accepted = len(probe.started)
    passed = (
        not slow and not report.hangs and not report.errors and not report.connect_failures and not report.closed
        and unfinished == 0 and accepted == capacity and crashes == 0
    )
    figure = (
        f"{report.summary()}; {len(slow)} first frames > 1 s; afterwards {unfinished} unfinished answers, "
        f"{accepted}/{capacity} simultaneous new chats accepted; {crashes} crashes"
    )
    return f"13 {args.chats} chats x {args.duration:.0f} s", figure, passed


def run_idle(args, data_dir, base_dir, questions, cookie):
    from django.conf import settings

    from chat.models import Message
    from tests.support import wsload

    wsload.free_socket_budget(2 * args.idle + 200)
    grace = settings.CSP_WS_PING_INTERVAL + settings.CSP_WS_PING_TIMEOUT + 5  # + daphne's 2 s check period, + slack
    with Server(args, data_dir, base_dir, "idle") as server:
        server.warm_up(questions[0], cookie)
        outcome = wsload.silent_sockets_dropped(
            server.url, server.pid, server.port, count=args.idle, rounds=2, question=questions[1], cookie=cookie, grace=grace
        )
        dead_unfinished = Message.objects.filter(role="assistant", finish_reason="").count()
        crashes = server.crashes()
    passed = outcome.passed(grace=grace, rss_growth=20e6) and dead_unfinished == 0 and crashes == 0
    return f"14 dead peer + {args.idle} idle sockets", f"{outcome.summary()}; {dead_unfinished} unfinished answers; {crashes} crashes", passed


def run_activation(args, data_dir, base_dir, questions, cookie, v2):
    from tests.support import wsload
    from training.services import adapter_version_activate

    seconds = min(args.duration, 20)

    def activate():
        time.sleep(seconds / 2)
        adapter_version_activate(version=v2)
        return time.monotonic()

    with Server(args, data_dir, base_dir, "activation") as server:
        server.warm_up(questions[0], cookie)
        report = wsload.chat_load(server.url, chats=args.activation_chats, duration=seconds, questions=questions, cookie=cookie, during=activate)
        crashes = server.crashes()
    outcome = wsload.activation_outcome(report, activated_at=report.during, old="v1", new="v2")
    return f"24 activation during {args.activation_chats} chats", f"{outcome.summary()}; {crashes} crashes", outcome.passed and crashes == 0


def main():
    args = parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    data_dir = setup_django()
    base_dir, v1_dir, v2_dir = prepare_model(args)
    _v1, v2 = make_versions(base_dir, v1_dir, v2_dir)
    cookie = session_cookie()
    from django.conf import settings

    questions = [r["instruction"] for r in json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[:6]]
    print(
        f"stress.py: base {args.base}, backend {args.backend}, answers <= {args.new_tokens} tokens, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; data in {data_dir}",
        flush=True,
    )
    runners = {
        "flood": lambda: run_flood(args, data_dir, base_dir, questions, cookie),
        "load": lambda: run_load(args, data_dir, base_dir, questions, cookie),
        "idle": lambda: run_idle(args, data_dir, base_dir, questions, cookie),
        "activation": lambda: run_activation(args, data_dir, base_dir, questions, cookie, v2),
    }
    rows = []
    for name in chosen:
        started = time.monotonic()
        scenario, figure, passed = runners[name]()
        print(f"  {scenario}: {figure} ({time.monotonic() - started:.0f} s)", flush=True)
        rows.append((scenario, figure, "pass" if passed else "FAIL"))
    print()
    print("| scenario | figure | pass/fail |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.exit(0 if all(row[2] == "pass" for row in rows) else 1)


if __name__ == "__main__":
    threading.excepthook = lambda hook: print(f"thread {hook.thread.name}: {hook.exc_value!r}", file=sys.stderr)
    main()
