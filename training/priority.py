"""A training run yields the CPU to the chats on a shared machine.

The default single-machine install trains and serves on the same cores. Measured on a 2-core box
(issue #14): a chat during the first training run took 2.3 s to its first token and streamed at
about 7 tokens/s. The run's threads get a higher nice value (CSP_TRAINING_NICE, default 10) for
its duration, so the scheduler runs the chat's decode threads first whenever both want a core;
an idle machine trains as fast as before (nice only matters under contention).

Linux keeps a nice value per thread, and a new thread starts with its creator's: every thread of
the worker process is reniced when the run starts (torch's compute pool, if it exists already,
included), and the threads the run starts later inherit it. Lowering a nice value again needs
privilege (CAP_SYS_NICE or RLIMIT_NICE): an unprivileged worker keeps the higher value after the
run, for the rest of its life, which only ever yields more to serving.
"""

import logging
import os

logger = logging.getLogger(__name__)
MAX_NICE = 19


def _thread_ids():
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process as a whole
        return [0]


class Yielding:
    """Context manager: this process's threads `increment` nicer while inside (0: unchanged)."""

    def __init__(self, increment):
        self.increment = int(increment)
        self.before = {}

    def __enter__(self):
        if self.increment <= 0 or not hasattr(os, "setpriority"):
            return self
        for thread in _thread_ids():
            try:
                current = os.getpriority(os.PRIO_PROCESS, thread)
                os.setpriority(os.PRIO_PROCESS, thread, min(MAX_NICE, current + self.increment))
                self.before[thread] = current
            except OSError:  # the thread ended meanwhile
                continue
        return self

    def __exit__(self, *exc_info):
        for thread, value in self.before.items():
            try:
                os.setpriority(os.PRIO_PROCESS, thread, value)
            except PermissionError:
                logger.debug("thread %s keeps its training nice value: lowering it needs privilege", thread)
            except OSError:
                continue
        return False
