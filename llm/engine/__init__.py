"""The chat inference engine: a pure package, no Django.

    from llm.engine import EngineConfig, Turn, Token, Done, EngineBusy, InputTooLong, make_engine
    engine = make_engine(config, "auto")   # TransformersEngine or LlamaCppEngine (or a remote one)

Every engine keeps one contract, `InferenceEngine` (protocol.py): submit / asubmit / stream /
generate, check_room, set_adapter, metrics, close. Local engines share `LocalEngine` (local.py):
the decode loop over a `Scheduler` (scheduler.py), an `AdapterTable` (adapters.py), per-request
`Sequence`s (sequence.py) whose text goes out through `AnswerText` (textstream.py, guard.py),
and `EngineMetrics` (metrics.py); the backends are `transformers.py` and `llamacpp.py`. Remote
engines (remote.py, openai.py) send requests to another process. A caller holds a `Request`
(request.py); every refusal is an `EngineError` with a `code` (events.py). `backends.py`
chooses the backend. Importing this package imports neither torch nor llama_cpp; `load()` (or
the first request) does.

`Engine` is the transformers engine's older name, kept for the callers that construct it.
"""

from llm.engine.adapters import CURRENT
from llm.engine.backends import BACKENDS, choose_backend, make_engine
from llm.engine.config import EngineConfig
from llm.engine.events import (
    CANCELLED,
    ERROR,
    FILTERED,
    FINISH_REASONS,
    LENGTH,
    STOP,
    TIMEOUT,
    BackendUnavailable,
    Done,
    EngineBusy,
    EngineClosed,
    EngineError,
    InputTooLong,
    InvalidRequest,
    Stats,
    Token,
    error_from_wire,
)
from llm.engine.llamacpp import LlamaCppEngine
from llm.engine.local import LocalEngine
from llm.engine.openai import OpenAIEngine
from llm.engine.prompts import Prompt
from llm.engine.protocol import InferenceEngine
from llm.engine.remote import RemoteEngine
from llm.engine.request import Request
from llm.engine.transformers import TransformersEngine
from llm.prompting import Turn

Engine = TransformersEngine

__all__ = [
    "BACKENDS",
    "CANCELLED",
    "CURRENT",
    "ERROR",
    "FILTERED",
    "FINISH_REASONS",
    "LENGTH",
    "STOP",
    "TIMEOUT",
    "BackendUnavailable",
    "Done",
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "InferenceEngine",
    "InputTooLong",
    "InvalidRequest",
    "LlamaCppEngine",
    "LocalEngine",
    "OpenAIEngine",
    "Prompt",
    "RemoteEngine",
    "Request",
    "Stats",
    "Token",
    "TransformersEngine",
    "Turn",
    "choose_backend",
    "error_from_wire",
    "make_engine",
]
