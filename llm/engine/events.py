"""What a request yields while it runs (`Token`), once at the end (`Done` with `Stats`), and the
errors that refuse a request before it runs. Plain dataclasses: no torch, no Django."""

import dataclasses
from dataclasses import dataclass

STOP = "stop"  # the model ended its turn (end-of-turn or EOS token)
LENGTH = "length"  # max_new_tokens reached
CANCELLED = "cancelled"  # request.cancel(), the consumer went away, or the engine closed
TIMEOUT = "timeout"  # max_seconds passed since submission
ERROR = "error"  # the model raised; Stats.error says what
FILTERED = "filtered"  # the leak guard stopped it before it printed protected text (llm.engine.guard)
FINISH_REASONS = (STOP, LENGTH, CANCELLED, TIMEOUT, ERROR, FILTERED)


@dataclass(frozen=True)
class Token:
    text: str  # a complete piece of text (never half a multi-byte character)


@dataclass
class Stats:
    request_id: str
    adapter: str | None  # the adapter version that answered; None = the base model
    finish_reason: str = ""
    tokens: int = 0  # generated tokens, the stop token not counted
    prompt_tokens: int = 0
    dropped_turns: int = 0  # oldest turns left out to fit max_input_tokens
    queued_ms: float | None = None  # submission to the start of its prefill
    first_token_ms: float | None = None  # submission to the first generated token
    latency_ms: float | None = None  # submission to the end
    error: str | None = None

    def as_dict(self):
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Done:
    stats: Stats


class EngineError(Exception):
    """Base class of the engine's refusals."""


class EngineBusy(EngineError):
    """K requests decode and Q wait already: come back in `retry_after` seconds (never queued)."""

    def __init__(self, retry_after):
        self.retry_after = retry_after
        super().__init__(f"the engine is busy; retry in {retry_after} s")


class InputTooLong(EngineError):
    """The new message (with the system prompt) cannot fit the prompt budget even alone."""

    def __init__(self, message, *, limit, size, unit):
        self.limit, self.size, self.unit = limit, size, unit
        super().__init__(message)


class EngineClosed(EngineError):
    """The engine was closed; it takes no more requests."""
