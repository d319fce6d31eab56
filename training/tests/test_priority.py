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


def test_the_autogroup_of_the_session_is_made_nicer_too(tmp_path):
    # Where the kernel groups by session, threads' nice values only weigh within the group: the
    # group's own value is what yields to a server in another session (a file standing in here).
    group = tmp_path / "autogroup"
    group.write_text("/autogroup-7 nice 2\n")
    with Yielding(10, autogroup=group, own_session=True):
        assert group.read_text() == "12"
    assert group.read_text() == "2"
    group.write_text("/autogroup-7 nice 15\n")
    with Yielding(10, autogroup=group, own_session=True):
        assert group.read_text() == "19"  # the most there is
    # a session the cluster shares (a shell that may also run the web server): the threads alone
    group.write_text("/autogroup-7 nice 0\n")
    with Yielding(10, autogroup=group, own_session=False):
        assert group.read_text() == "/autogroup-7 nice 0\n"
    with Yielding(10, autogroup=group):  # this pytest's session is not a qcluster's
        assert group.read_text() == "/autogroup-7 nice 0\n"
    before = _nice()
    with Yielding(10, autogroup=tmp_path / "none"):  # autogroups off: the threads alone
        assert _nice() == min(19, before + 10)
