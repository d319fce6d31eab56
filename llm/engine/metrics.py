"""A local engine's counters: what the metrics page, the admin and the tests read."""

from llm.engine.events import LENGTH, STOP


class EngineMetrics:
    def __init__(self):
        self.decode_steps = 0
        self.max_batch_seen = 0  # most sequences advanced by one forward (one batch)
        self.requests_finished = 0
        self.latency_ema = None  # seconds, over answers that ended normally (stop, length)
        self.drafted = 0  # draft tokens verified (llm.engine.drafting)
        self.draft_accepted = 0  # of them, the ones the model agreed with

    def step(self, batch_size):
        """One decode forward of `batch_size` sequences."""
        self.decode_steps += 1
        self.max_batch_seen = max(self.max_batch_seen, batch_size)

    def verified(self, proposed, taken):
        """A draft of `proposed` tokens was verified and `taken` of them kept."""
        self.drafted += proposed
        self.draft_accepted += taken

    def finished(self, reason, latency):
        self.requests_finished += 1
        if reason in (STOP, LENGTH):  # a cancelled or failed answer says nothing of how long one takes
            self.latency_ema = latency if self.latency_ema is None else 0.8 * self.latency_ema + 0.2 * latency

    def as_dict(self):
        return {
            "decode_steps": self.decode_steps,
            "max_batch_seen": self.max_batch_seen,
            "requests_finished": self.requests_finished,
            "latency_ema_s": self.latency_ema,
            "drafted_tokens": self.drafted,
            "draft_accepted_tokens": self.draft_accepted,
        }
