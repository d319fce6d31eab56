"""A training run's threads yield to serving: nicer while it runs, new threads too."""

import os
import threading

from training.priority import Yielding


def _nice():
    return os.getpriority(os.PRIO_PROCESS, 0)  # Linux: the calling thread's


def test_the_run_and_the_threads_it_starts_are_nicer_while_it_runs():
    seen = {}

    def run():
        before = _nice()
        with Yielding(5):
            seen["inside"] = _nice() - before
            child = threading.Thread(target=lambda: seen.setdefault("child", _nice() - before))
            child.start()
            child.join()
        seen["after"] = _nice() - before

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["inside"] == 5 and seen["child"] == 5
    # restored where the process may lower a nice value (root, CAP_SYS_NICE), else it stays
    assert seen["after"] == (0 if os.geteuid() == 0 else 5)


def test_zero_leaves_the_priority_alone():
    before = _nice()
    with Yielding(0):
        assert _nice() == before
