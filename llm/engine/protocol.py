"""The one contract every engine keeps, local or remote: what the transports and chat code call.

    engine: InferenceEngine = make_engine(config, "auto")
    engine.check_room()                                # EngineBusy / EngineClosed before any work
    request = await engine.asubmit(history, on_event=...)
    async for event in request: ...                    # Token(text)... then Done(stats)

Local engines (`TransformersEngine`, `LlamaCppEngine`: llm.engine.local) decode here; remote
ones (`OpenAIEngine`, the Django side's WorkerEngine: llm.engine.remote) send the request to
another process. Neither kind inherits from the other; both satisfy this protocol.
"""

from typing import Any, AsyncIterator, Protocol, runtime_checkable

from llm.engine.config import EngineConfig
from llm.engine.request import Request


@runtime_checkable
class InferenceEngine(Protocol):
    config: EngineConfig
    backend: str  # "transformers", "llamacpp", "worker", "openai"
    backend_reason: str  # why this backend serves (the admin shows it)
    dtype_reason: str | None
    remote: bool  # the model runs in another process
    supports_choices: bool  # submit() takes `choices` (local engines; chat.grounding.rerank)
    current_adapter: str | None  # the version new requests answer with (None: the base model)

    @property
    def loaded(self) -> bool: ...

    @property
    def loaded_adapters(self) -> list: ...

    def load(self) -> None: ...

    async def aload(self) -> None: ...

    def set_adapter(self, name: str | None, path: Any = None) -> None: ...

    def check_room(self) -> None: ...

    def busy_now(self) -> Exception | None: ...

    def submit(self, history, **options) -> Request: ...

    async def asubmit(self, history, **options) -> Request: ...

    def stream(self, history, **options) -> AsyncIterator: ...

    def generate(self, history, *, timeout=None, **options) -> tuple: ...

    def metrics(self) -> dict: ...

    def close(self, timeout: float = 10) -> None: ...


class DerivedCalls:
    """`stream()` and `generate()` for every engine, local or remote: both follow from `submit` /
    `asubmit`, so they are written once here."""

    async def stream(self, history, **options):
        """Yield Token(text)... then Done(stats); closing the iteration early cancels the request."""
        request = await self.asubmit(history, **options)
        try:
            async for event in request:
                yield event
        finally:
            request.cancel()

    def generate(self, history, *, timeout=None, **options):
        """Answer synchronously: (text, stats). Blocks the calling thread, so not in an event loop."""
        return self.submit(history, **options).result(timeout)
