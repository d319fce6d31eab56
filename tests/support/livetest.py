"""A real daphne for tests that need a server in another process (never used in production).

    with live_daphne(env={"CSP_BASE_MODEL": ...}, log=tmp / "daphne.log") as url:
        ...  # url = "http://127.0.0.1:<free port>"

The server runs the project on the caller's database (DATABASE_URL from the connection's settings:
the pytest test database file, shared with the subprocess) with the caller's SECRET_KEY, in its own
process group, and is stopped (SIGTERM, then SIGKILL) on exit.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/support/livetest.py
# The local Redis (started before the session and by .ci/run); tests use their own database in it.
TEST_REDIS_URL = "redis://127.0.0.1:6379/14"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(data_dir):
    """`manage.py serve` (daphne + the q2 cluster, as `make run` ends) on a fresh SQLite database
    under data_dir, migrated first, on a free port: (the process, its port). Stop it yourself
    (Ctrl-C: `send_signal(signal.SIGINT)`, then `communicate()`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(CSP_DATA_DIR=str(data_dir), CSP_ADMIN_PASSWORD="a-long-chosen-pass", OMP_NUM_THREADS="1")
    env.setdefault("CSP_GROUNDING", "false")  # as in-process tests: conftest._grounding_as_marked
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=300)
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return serve, port


def wait_for_port(port, process, log, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError("the server exited:\n" + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start listening:\n" + log.read_text()[-3000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


def stop(process, timeout=10):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def database_env():
    """DATABASE_URL and SECRET_KEY that make a subprocess use this process's (test) database."""
    from django.conf import settings
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        url = f"sqlite:///{db['NAME']}"
    else:
        user, password = quote(db["USER"] or "", safe=""), quote(db["PASSWORD"] or "", safe="")
        url = f"postgres://{user}:{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return {"DATABASE_URL": url, "SECRET_KEY": settings.SECRET_KEY}


@contextlib.contextmanager
def live_daphne(*, env, log, daphne_args=()):
    """daphne_args: extra daphne options, e.g. ("--ping-interval", "1", "--ping-timeout", "2")."""
    port = free_port()
    # Grounding off unless the caller turns it on, as for in-process tests (conftest._grounding_as_marked).
    full_env = {**os.environ, "CSP_GROUNDING": "false", **database_env(), **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), *daphne_args, "csplatform.asgi:application"],
        cwd=ROOT, env=full_env, start_new_session=True, stdout=Path(log).open("w"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process, Path(log))
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
