"""The messages between web processes and inference workers, over the channel layer.

A web process sends `Submit` to the named channel CSP_INFERENCE_CHANNEL (channels-redis: a Redis
list, so whichever worker is free takes it) and waits for `Accepted` (with the version that
answers) or `Refused` (an engine error's wire form: busy, too_long, closed, invalid,
unavailable). `Tokens` then come back to the web process's own reply channel (those generated
while the last message was being sent go together: a slow link gets fewer, larger messages, not
a backlog), then `Finished` with the answer's stats. `Cancel` goes to the worker's own channel,
so it reaches the worker that runs the request.

Every message is a small dict of JSON types on the wire (channels-redis serialises with
msgpack); `to_message()` and `parse()` convert.
"""

import dataclasses
from dataclasses import dataclass, field

PREFIX = "inference."


@dataclass
class Message:
    id: str  # the request's id in the web process

    kind = ""

    def to_message(self):
        return {"type": PREFIX + self.kind, **dataclasses.asdict(self)}


@dataclass
class Submit(Message):
    reply: str  # the web process's reply channel
    deadline: float  # epoch seconds: a worker that takes it later drops it (its web process gave up)
    history: list  # [[role, text], ...]
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    pinned: bool = False  # adapter names the version; else the worker's current one answers
    adapter: str | None = None
    adapter_path: str | None = None

    kind = "submit"


@dataclass
class Cancel(Message):
    kind = "cancel"


@dataclass
class Reply(Message):
    worker: str  # the worker's own channel: where Cancel goes

    kind = ""


@dataclass
class Accepted(Reply):
    adapter: str | None = None
    prompt_tokens: int = 0
    dropped_turns: int = 0
    served_by: str = ""

    kind = "accepted"


@dataclass
class Refused(Reply):
    error: dict = field(default_factory=dict)  # an EngineError's wire(): {"code", "message", ...}

    kind = "refused"


@dataclass
class Tokens(Reply):
    text: str = ""

    kind = "tokens"


@dataclass
class Finished(Reply):
    stats: dict = field(default_factory=dict)  # Stats.as_dict()

    kind = "done"


KINDS = {cls.kind: cls for cls in (Submit, Cancel, Accepted, Refused, Tokens, Finished)}


def parse(message):
    """The typed message of a channel-layer dict; None for a type this side does not know.
    Unknown fields are ignored (the two sides may differ in version)."""
    kind = str(message.get("type", "")).removeprefix(PREFIX)
    cls = KINDS.get(kind)
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in message.items() if name in names})
