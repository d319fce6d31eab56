"""Fixtures of the training tests that run a real django-q2 cluster."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.livetest import database_env

ROOT = Path(__file__).resolve().parents[2]


class Cluster:
    """`manage.py qcluster` in its own process group (its parent, sentinel, pusher, monitor, workers)."""

    def __init__(self, process, log):
        self.process = process
        self.log = log

    def log_tail(self, chars=3000):
        return self.log.read_text(errors="replace")[-chars:]

    def signal(self, signum):
        """Send signum to every process of the cluster, as systemd stopping a service does (KillMode=control-group)."""
        os.killpg(self.process.pid, signum)

    def processes(self):
        """`ps` lines of the processes left in the cluster's session, for failure messages."""
        return subprocess.run(["ps", "-o", "pid,stat,args", "--sid", str(self.process.pid)], capture_output=True, text=True).stdout

    def children_alive(self):
        """Pids of the cluster's processes still running, but for the `manage.py qcluster` parent.

        The parent hangs when the whole group gets SIGTERM: its sentinel dies at once (q2 leaves it
        the default action) and the parent waits forever on a multiprocessing Event that the dead
        sentinel would have acknowledged. Under systemd the stop timeout ends it; nothing is lost.
        """
        alive = []
        for line in self.processes().splitlines()[1:]:
            pid, stat = line.split()[:2]
            if int(pid) != self.process.pid and not stat.startswith("Z"):
                alive.append(int(pid))
        return alive


@pytest.fixture(autouse=True)
def _pairs_as_they_are(settings):
    """The training tests count steps, checkpoints and memorised answers of runs on the pairs as
    they are; RAFT (CSP_RAFT, on by default) turns each pair into several longer examples. The
    tests of RAFT runs turn it back on."""
    settings.CSP_RAFT = False


@pytest.fixture
def qcluster(settings, training_env, tiny_model):
    """Start a q2 cluster on this test's database and data folder: `qcluster(CSP_...="...")`.

    Tests using it need `django_db(transaction=True)`: the cluster reads what the test committed.
    Every cluster still running at teardown is SIGKILLed, all its processes.
    """
    clusters = []

    def start(**env):
        full_env = {
            **os.environ,
            **database_env(),  # this test's database (and SECRET_KEY: q2 signs tasks, the worker must share it)
            "CSP_DATA_DIR": str(training_env),
            "CSP_BASE_MODEL": str(tiny_model),
            "CSP_HEARTBEAT_SECONDS": "1",
            # The cluster's scheduler runs the reconciler: on a busy machine a short limit would
            # fail a live run. Scenario 18 (a dead worker) sets its own.
            "CSP_HEARTBEAT_TIMEOUT": "30",
            "CSP_EVAL_MAX_PAIRS": "0",  # these tests are about the run's life, not its answers
            "OMP_NUM_THREADS": "1",  # the tests share the cores; spinning threads only slow them
            "CSP_TRAINING_DEVICE": "cpu",
            "CSP_RAFT": "false",  # steps counted on the pairs as they are (see _pairs_as_they_are)
            **env,
        }
        log = training_env / f"qcluster-{len(clusters)}.log"
        process = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=full_env, start_new_session=True,
            stdout=log.open("w"), stderr=subprocess.STDOUT,
        )
        clusters.append(Cluster(process, log))
        return clusters[-1]

    yield start
    for cluster in clusters:
        try:
            cluster.signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        cluster.process.wait()

