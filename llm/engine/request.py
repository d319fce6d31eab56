"""A request's public handle: what a caller holds while its answer is generated.

    request = engine.submit(history)             # or: await engine.asubmit(history)
    request.adapter, request.stats               # the version that answers; counts so far
    async for event in request: ...              # Token(text)... then Done(stats)
    text, stats = request.result(timeout=30)     # or block for it (not on an event loop)
    request.cancel()                             # stops at the next step boundary

The decode state (cache slot, position, text stream, leak guard) is not here: each backend keeps
it in its own per-sequence object (`llm.engine.sequence.Sequence` for local engines). An engine
reports to the handle through `emit` (a piece of text) and `finish` (the end, once); nothing
else writes to it.
"""

import asyncio
import logging
import threading
import time
import uuid

from llm.engine.events import Done, Stats, Token

logger = logging.getLogger(__name__)


class Request:
    def __init__(
        self, *, adapter, max_new_tokens, temperature, top_p, seed, on_event, prompt=None, clock=time.monotonic,
        choice_ids=(),
    ):
        self.id = uuid.uuid4().hex[:12]
        self.prompt = prompt  # the rendered Prompt (None when another process renders it)
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        # Token ids the one answer token is chosen from (LocalEngine.submit's `choices`): empty
        # for a free answer.
        self.choice_ids = tuple(choice_ids)
        self.stats = Stats(
            request_id=self.id, adapter=adapter,
            prompt_tokens=len(prompt.ids) if prompt else 0, dropped_turns=prompt.dropped_turns if prompt else 0,
        )
        self.clock = clock
        self.created = clock()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._finishing = threading.Lock()
        self._finished = False
        self._on_event = on_event
        self._pieces = []
        self._token_ids = ()
        try:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
        except RuntimeError:  # submitted from a plain thread: result() and on_event only
            self._loop = self._queue = None

    def cancel(self):
        """Stop generating: takes effect at the next step boundary (the current step's token is dropped)."""
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    @property
    def done(self):
        return self._done.is_set()

    @property
    def text(self):
        """The text streamed so far (all of it once done)."""
        return "".join(self._pieces)

    @property
    def token_ids(self):
        """Once done, the ids generated, the stop token not counted: what the model said before the
        text stream and the leak guard saw it (empty for an answer generated in another process)."""
        return list(self._token_ids)

    def result(self, timeout=None):
        """Block until done; returns (text, stats). Not from an event loop: iterate instead."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        return self.text, self.stats

    def __aiter__(self):
        if self._queue is None:
            raise RuntimeError("this request was submitted outside an event loop; use result() or on_event")
        return self._events()

    async def _events(self):
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Done):
                return

    # -- the engine's side

    def emit(self, text):
        """A piece of the answer, to the caller (ignored once finished)."""
        if text and not self._finished:
            self._deliver(Token(text))

    def finish(self, stats=None, token_ids=()):
        """The end, once: Done(stats) to the caller; False when it had finished already."""
        with self._finishing:
            if self._finished:
                return False
            self._finished = True
        if stats is not None:
            self.stats = stats
        self._token_ids = tuple(token_ids)
        self._deliver(Done(self.stats))
        self._done.set()
        return True

    def _deliver(self, event):
        if isinstance(event, Token):
            self._pieces.append(event.text)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("on_event of request %s raised; cancelling it", self.id)
                self.cancel()
        if self._queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self.cancel()
