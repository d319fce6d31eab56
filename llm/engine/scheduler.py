"""Admission and queueing of a local engine: who waits, who runs, who is refused, who ran too long.

K sequences run (prefilling or decoding) and Q wait; a request beyond K + Q is refused at once
with EngineBusy (never queued), its retry_after about one answer's time. The decode thread waits
on `lock` (a Condition) for work, and each iteration `admit()`s waiting sequences while fewer
than K run. `lock` also guards the adapter table (llm.engine.adapters): the loop's wait looks at
both. `clock` is injectable (time.monotonic by default) so timeouts can be tested without sleeping.
"""

import collections
import math
import threading
import time

from llm.engine.events import CANCELLED, TIMEOUT, EngineBusy, EngineClosed
from llm.engine.sequence import DONE, RUNNING


class Scheduler:
    def __init__(self, config, metrics, clock=time.monotonic):
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.lock = threading.Condition()  # held briefly: queue, counters, adapter table
        self.waiting = collections.deque()
        self.prefilling = []  # admitted, their prompt not all in the cache yet
        self.running = 0  # prefilling + decoding (the K in K + Q)
        self.closed = False

    def busy(self):
        """EngineBusy when K run and Q wait, else None (read without the lock it is advisory)."""
        if self.running + len(self.waiting) < self.config.max_active + self.config.max_waiting:
            return None
        # About one answer's time frees a slot: the recent average latency, at least a second.
        return EngineBusy(retry_after=max(1, math.ceil(self.metrics.latency_ema or 1.0)))

    def refuse_if_full(self):
        """Under `lock`: EngineClosed when closed, EngineBusy when K run and Q wait."""
        if self.closed:
            raise EngineClosed("the engine is closed")
        busy = self.busy()
        if busy:
            raise busy

    def check_room(self):
        with self.lock:
            self.refuse_if_full()

    def enqueue(self, sequence):
        with self.lock:
            self.refuse_if_full()  # again: others may have queued while this one rendered
            self.waiting.append(sequence)
            self.lock.notify_all()

    def wait_for_work(self, more):
        """Block until there is something to do (`more()`, under the lock, says whether the
        backend or the adapter table has); False once closed."""
        with self.lock:
            while not (self.closed or self.waiting or self.prefilling or more()):
                self.lock.wait()
            return not self.closed

    def admit(self):
        """Start waiting sequences while fewer than K run; returns [(sequence, reason)] of the
        waiting ones that were cancelled or ran out of time (taken off the queue)."""
        with self.lock:
            while self.waiting and self.running < self.config.max_active:
                sequence = self.waiting.popleft()
                sequence.phase = RUNNING
                sequence.request.stats.queued_ms = (self.clock() - sequence.request.created) * 1000
                self.prefilling.append(sequence)
                self.running += 1
            expired = [(s, reason) for s in self.waiting if (reason := self.reason_to_end(s))]
            for sequence, _ in expired:
                self.waiting.remove(sequence)
        return expired

    def reason_to_end(self, sequence):
        """CANCELLED, TIMEOUT, or None while the sequence may go on."""
        request = sequence.request
        if request.cancelled:
            return CANCELLED
        if self.clock() - request.created > self.config.max_seconds:
            return TIMEOUT
        return None

    def finished(self, sequence):
        """Mark it done (False when it was already); a running one frees its place."""
        with self.lock:
            if sequence.phase == DONE:
                return False
            if sequence.phase == RUNNING:
                self.running -= 1
            sequence.phase = DONE
            return True

    def drain(self):
        """Take every waiting and prefilling sequence off the queues (the loop is ending)."""
        with self.lock:
            pending = list(self.waiting) + list(self.prefilling)
            self.waiting.clear()
            self.prefilling.clear()
        return pending

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def wake(self):
        with self.lock:
            self.lock.notify_all()
