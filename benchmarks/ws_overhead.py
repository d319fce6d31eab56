"""First-token time over the chat websocket (a real daphne) vs the engine alone in-process.

    .venv/bin/python benchmarks/ws_overhead.py                 # 11 alternating rounds
    .venv/bin/python benchmarks/ws_overhead.py --rounds 21 --port 8765

What it does: makes a temporary CSP_DATA_DIR, runs `manage.py migrate` there, starts
`daphne csplatform.asgi:application` on 127.0.0.1 with CSP_BASE_MODEL = the Gemma directory and
no adapter version (the base model answers), opens the websocket /ws/chat/ with websocket-client
(Origin http://127.0.0.1:<port>, as a browser on the page sends), and sends one warm-up message
(the daphne process loads its engine lazily on the first message).

Each round then
  ws      opens a fresh connection (a new customer, a new conversation) and times the message
          frame's send to the first "token" frame; connecting is timed apart;
  engine  the same question on an in-process Engine with the same configuration (its own dtype
          choice, max_active 8): `engine.stream` call to the first Token.
Both answers are capped at --new-tokens (CSP_CHAT_MAX_NEW_TOKENS for daphne), so a round is short.
The rounds alternate so that both see the same load; the daphne engine's own first_token_ms (from
the "done" frame) splits the websocket figure into engine time and everything around it
(consumer, session, three ORM writes in SQLite, JSON, the socket).

Target (issue): the websocket adds <= 50 ms to the first token.
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import common
from tests.support.livetest import free_port  # common put the repository on the path


def wait_for_port(port, process, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"daphne did not listen on {port} within {timeout} s")


def ws_round(port, question, timeout=120):
    """(connect s, send -> first token frame s, the done frame) for one message on a new socket."""
    import websocket

    started = time.perf_counter()
    sock = websocket.create_connection(f"ws://127.0.0.1:{port}/ws/chat/", origin=f"http://127.0.0.1:{port}", timeout=timeout)
    connected = time.perf_counter()
    try:
        sent = time.perf_counter()
        sock.send(json.dumps({"type": "message", "text": question, "conversation": None}, ensure_ascii=False))
        first = None
        while True:
            frame = json.loads(sock.recv())
            if frame["type"] == "token" and first is None:
                first = time.perf_counter()
            elif frame["type"] == "done":
                return connected - started, (first - sent) if first else None, frame
            elif frame["type"] in ("error", "busy"):
                raise RuntimeError(f"the server answered {frame}")
    finally:
        sock.close()


async def engine_first_token(engine, question, new_tokens):
    from llm.engine import Token

    started = time.perf_counter()
    first = None
    async for event in engine.stream(question, max_new_tokens=new_tokens):
        if isinstance(event, Token) and first is None:
            first = time.perf_counter() - started
    return first


def measure(daphne, port, args):
    """Warm both paths, then alternate websocket and in-process rounds: [(connect, ws, daphne's engine, engine)]."""
    from llm.engine import Engine, EngineConfig

    wait_for_port(port, daphne)
    question = common.questions(1, offset=5)[0]
    started = time.perf_counter()
    ws_round(port, question)  # loads the daphne process's engine
    print(f"daphne on port {port} (pid {daphne.pid}); its engine loaded and warmed in {time.perf_counter() - started:.1f} s", flush=True)

    engine = Engine(EngineConfig(base_dir=args.base, max_new_tokens=args.new_tokens))
    engine.load()
    asyncio.run(engine_first_token(engine, question, args.new_tokens))  # warm-up
    rows = []
    try:
        for round_ in range(args.rounds):
            connect_s, ws_s, done = ws_round(port, question)
            engine_s = asyncio.run(engine_first_token(engine, question, args.new_tokens))
            server_engine_s = done["first_token_ms"] / 1000
            rows.append((connect_s, ws_s, server_engine_s, engine_s))
            print(
                f"  round {round_ + 1}: websocket {ws_s * 1000:.0f} ms (daphne's engine {server_engine_s * 1000:.0f} ms), "
                f"in-process engine {engine_s * 1000:.0f} ms",
                flush=True,
            )
    finally:
        engine.close()
    return rows


def main():
    parser = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]), new_tokens=8)
    parser.add_argument("--rounds", type=int, default=11, help="alternating websocket / in-process rounds (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="daphne's port (default: a free one)")
    args = parser.parse_args()

    import torch

    print(f"ws_overhead.py: {args.rounds} rounds, answers capped at {args.new_tokens} tokens; {common.load_average()}; torch threads {torch.get_num_threads()}")
    data_dir = tempfile.mkdtemp(prefix="csp-ws-bench-")
    port = args.port or free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CSP_")}
    env.update(
        CSP_DATA_DIR=data_dir,
        CSP_BASE_MODEL=str(args.base),
        CSP_CHAT_MAX_NEW_TOKENS=str(args.new_tokens),
        DJANGO_SETTINGS_MODULE="csplatform.settings",
        DEBUG="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("DATABASE_URL", None)  # SQLite in the temporary data dir, whatever the shell says
    env.pop("REDIS_URL", None)
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "--no-input", "-v0"], cwd=common.ROOT, env=env, check=True)
    log_path = os.path.join(data_dir, "daphne.log")
    with open(log_path, "w") as log:
        daphne = subprocess.Popen(
            [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "csplatform.asgi:application"],
            cwd=common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            rows = measure(daphne, port, args)
        except BaseException:
            print(f"daphne's log is kept in {log_path}")
            raise
        finally:
            daphne.terminate()  # the one process this script started
            try:
                daphne.wait(10)
            except subprocess.TimeoutExpired:
                daphne.kill()
    shutil.rmtree(data_dir, ignore_errors=True)

    def stats(values):
        return [f"{common.median(values) * 1000:.0f}", f"{min(values) * 1000:.0f}", f"{max(values) * 1000:.0f}"]

    connect, ws, daphne_engine, engine = ([r[i] for r in rows] for i in range(4))
    table = [
        ["connect (handshake, session)", *stats(connect)],
        ["websocket: send -> first token frame", *stats(ws)],
        ["  of which daphne's engine (done.first_token_ms)", *stats(daphne_engine)],
        ["  around the engine (websocket - its engine)", *stats([w - d for w, d in zip(ws, daphne_engine)])],
        ["in-process engine: stream -> first Token", *stats(engine)],
        ["extra (websocket - in-process), paired per round", *stats([w - e for w, e in zip(ws, engine)])],
    ]
    print()
    common.print_table(["first token", "median ms", "min ms", "max ms"], table)
    extra = common.median([w - e for w, e in zip(ws, engine)])
    print()
    print(
        f"websocket / in-process first token: {common.median(ws) / common.median(engine):.2f}x; "
        f"extra {extra * 1000:.0f} ms (target <= 50 ms: {'met' if extra <= 0.05 else 'MISSED'})"
    )
    print(f"after: {common.load_average()}")


if __name__ == "__main__":
    main()
