"""`make run`'s last step: daphne and the q2 cluster start together and Ctrl-C stops both."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support.livetest import free_port

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent


def test_serve_runs_web_and_queue_and_ctrl_c_stops_every_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(CSP_DATA_DIR=str(tmp_path), CSP_ADMIN_PASSWORD="a-long-chosen-pass")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=300)
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
        family = psutil.Process(serve.pid).children(recursive=True)
        commands = " ".join(" ".join(p.cmdline()) for p in family)
        assert "daphne" in commands and "qcluster" in commands
    finally:
        serve.send_signal(signal.SIGINT)
        output, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, output
    assert f"http://127.0.0.1:{port}/admin/" in output
    time.sleep(0.5)
    assert [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
