"""`make run`'s last step: daphne and the q2 cluster start together and Ctrl-C stops both."""

import signal
import time
import urllib.request

import psutil
import pytest

from tests.support.livetest import start_serve

pytestmark = pytest.mark.live


def test_serve_runs_web_and_queue_and_ctrl_c_stops_every_process(tmp_path):
    serve, port = start_serve(tmp_path)
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
