"""A training run yields the CPU to the chats on a shared machine.

The default single-machine install trains and serves on the same cores. Measured on a 2-core box
(issue #14): a chat during the first training run took 2.3 s to its first token and streamed at
about 7 tokens/s. The run's threads get a higher nice value (CSP_TRAINING_NICE, default 10) for
its duration, so the scheduler runs the chat's decode threads first whenever both want a core;
an idle machine trains as fast as before (nice only matters under contention).

Linux keeps a nice value per thread, and a new thread starts with its creator's: every thread of
the worker process is reniced when the run starts (torch's compute pool, if it exists already,
included), and the threads the run starts later inherit it.

A thread's nice value only weighs against threads of its own *autogroup* where the kernel groups
by session (sched_autogroup_enabled, the default of most distributions): `manage.py serve`
starts the cluster in a session of its own, and there the CPU is shared between the sessions,
whatever the threads' nice values. So the worker's autogroup is made as much nicer too
(/proc/self/autogroup), where the session is the cluster's own (its leader is a qcluster
process: `serve`, a systemd unit): the cluster's other processes, which share it, yield with the
run. A session led by anything else (a shell that also runs the web server) may hold the server,
which must not yield: there the threads alone are reniced, which weighs against a server in the
same session. A worker killed mid-run (SIGKILL, q2's timeout) leaves the cluster's autogroup
nicer, which slows only the cluster.

Lowering a nice value again needs privilege (CAP_SYS_NICE or RLIMIT_NICE): an unprivileged
worker keeps the higher values after the run, for the rest of its life, which only ever yields
more to serving.
"""

import logging
import os

logger = logging.getLogger(__name__)
MAX_NICE = 19
AUTOGROUP = "/proc/self/autogroup"  # "/autogroup-85 nice 0"; writing a number sets the nice value


def _thread_ids():
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process as a whole
        return [0]


class Yielding:
    """Context manager: this process's threads `increment` nicer while inside (0: unchanged)."""

    def __init__(self, increment, *, autogroup=AUTOGROUP, own_session=None):
        self.increment = int(increment)
        self.autogroup = autogroup
        # whether this session is the cluster's alone (None: its leader is a qcluster process)
        self.own_session = own_session
        self.before = {}
        self.group_before = None

    def __enter__(self):
        if self.increment <= 0 or not hasattr(os, "setpriority"):
            return self
        own_session = _cluster_session() if self.own_session is None else self.own_session
        group = _read_group_nice(self.autogroup) if own_session else None
        if group is not None and _write_group_nice(self.autogroup, min(MAX_NICE, group + self.increment)):
            self.group_before = group
        for thread in _thread_ids():
            try:
                current = os.getpriority(os.PRIO_PROCESS, thread)
                os.setpriority(os.PRIO_PROCESS, thread, min(MAX_NICE, current + self.increment))
                self.before[thread] = current
            except OSError:  # the thread ended meanwhile
                continue
        return self

    def __exit__(self, *exc_info):
        if self.group_before is not None and not _write_group_nice(self.autogroup, self.group_before):
            logger.debug("the worker's autogroup keeps its training nice value: lowering it needs privilege")
        for thread, value in self.before.items():
            try:
                os.setpriority(os.PRIO_PROCESS, thread, value)
            except PermissionError:
                logger.debug("thread %s keeps its training nice value: lowering it needs privilege", thread)
            except OSError:
                continue
        return False


def _read_group_nice(path):
    """The autogroup's nice value, or None where there is none (not Linux, autogroups off)."""
    try:
        with open(path, encoding="ascii") as group:
            return int(group.read().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


def _write_group_nice(path, value):
    try:
        with open(path, "w", encoding="ascii") as group:
            group.write(str(value))
        return True
    except OSError:  # lowering it without privilege; autogroups turned off
        return False


def _cluster_session():
    """Whether this process's session was started for the q2 cluster (its leader runs qcluster)."""
    try:
        with open(f"/proc/{os.getsid(0)}/cmdline", "rb") as leader:
            return b"qcluster" in leader.read()
    except OSError:
        return False
