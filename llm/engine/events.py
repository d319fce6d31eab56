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
    # A request with `choices`: the probability of each choice (their softmax, in their order).
    choice_probs: list | None = None

    def as_dict(self):
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Done:
    stats: Stats


class WireError(Exception):
    """An error with a `code`, the word every transport sends for it (the websocket's error frame,
    the REST body, the inference worker's refusal), so a transport maps one code to its status
    instead of keeping its own map of exception classes."""

    code = "unavailable"

    def details(self):
        """The fields beside `code` and `message` that a client needs (retry_after, the limit)."""
        return {}

    def wire(self):
        """{"code", "message", ...details}: JSON types only, what crosses a process boundary."""
        return {"code": self.code, "message": str(self), **self.details()}


class EngineError(WireError):
    """Base class of the engine's refusals; as such: the model cannot answer now (it cannot be
    loaded, a remote side does not answer)."""

    code = "unavailable"


class EngineBusy(EngineError):
    """K requests decode and Q wait already: come back in `retry_after` seconds (never queued)."""

    code = "busy"

    def __init__(self, retry_after):
        self.retry_after = retry_after
        super().__init__(f"the engine is busy; retry in {retry_after} s")

    def details(self):
        return {"retry_after": self.retry_after}


class InputTooLong(EngineError):
    """The new message (with the system prompt) cannot fit the prompt budget even alone."""

    code = "too_long"

    def __init__(self, message, *, limit, size, unit):
        self.limit, self.size, self.unit = limit, size, unit
        super().__init__(message)

    def details(self):
        return {"limit": self.limit, "size": self.size, "unit": self.unit}


class EngineClosed(EngineError):
    """The engine was closed; it takes no more requests."""

    code = "closed"


class BackendUnavailable(EngineError):
    """The configured backend cannot serve this base model on this host."""


class InvalidRequest(WireError, ValueError):
    """The request itself is wrong (an option out of range, an adapter that is not there),
    refused by another process: a ValueError, as a local engine raises it."""

    code = "invalid"


def error_from_wire(data):
    """The exception a `wire()` dict stands for (an unknown code: EngineError, "unavailable")."""
    code, message = data.get("code"), data.get("message", "")
    if code == EngineBusy.code:
        return EngineBusy(retry_after=data.get("retry_after", 1))
    if code == InputTooLong.code:
        return InputTooLong(message, limit=data.get("limit"), size=data.get("size"), unit=data.get("unit"))
    if code == EngineClosed.code:
        return EngineClosed(message)
    if code == InvalidRequest.code:
        return InvalidRequest(message)
    return EngineError(message)
