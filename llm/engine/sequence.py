"""A local engine's decode state of one request: where its prompt and tokens are, and its text.

The request's handle (`llm.engine.request.Request`) is what the caller holds; a `Sequence` is
what the decode thread works on, and only the decode thread (and the backend's step) touches it.
"""

from dataclasses import dataclass

WAITING, RUNNING, DONE = "waiting", "running", "done"


@dataclass(eq=False)  # identity: a sequence is found in batches and lists by being itself
class Sequence:
    request: object  # llm.engine.request.Request
    protected: tuple = ()  # texts the leak guard keeps out of the answer (empty: no guard)
    stop_ids: frozenset = frozenset()  # where its answer ends: the ids of its prompt's format
    phase: str = WAITING
    output: object = None  # AnswerText, from the start of the prefill
    slot: object = None  # the backend's per-sequence state (a KV cache while prefilling, a sequence id)
    prefilled: int = 0  # prompt tokens already in the KV cache
    position: int = 0  # tokens in the KV cache = position of the next input token
    last: int | None = None  # last generated token: the next step's input
    generated: int = 0
    generator: object = None  # the seeded sampling generator, when sampling
    drafter: object = None  # llm.engine.drafting.PromptLookup of a greedy answer, when drafting is on

    @property
    def prompt_ids(self):
        return self.request.prompt.ids

    @property
    def adapter(self):
        return self.request.adapter

    @property
    def temperature(self):
        return self.request.temperature

    @property
    def id(self):
        return self.request.id
