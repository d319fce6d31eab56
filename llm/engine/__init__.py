"""The chat inference engine: a pure module, no Django.

    from llm.engine import Engine, EngineConfig, Turn, Token, Done, EngineBusy, InputTooLong
    engine = make_engine(config, "auto")   # Engine (transformers) or LlamaCppEngine (llama.cpp)

Both backends keep one contract, `llm.engine.base.BaseEngine`: how requests are admitted,
streamed, cancelled and swapped between adapters. `llm.engine.engine` is the transformers side,
`llm.engine.llamacpp` the llama.cpp side, `llm.engine.backends` chooses between them. Importing
this package imports neither torch nor llama_cpp; `load()` (or the first request) does.
"""

from llm.engine.backends import BACKENDS, BackendUnavailable, choose_backend, make_engine
from llm.engine.base import CURRENT, Request
from llm.engine.config import EngineConfig
from llm.engine.engine import Engine
from llm.engine.events import (
    CANCELLED,
    ERROR,
    FINISH_REASONS,
    LENGTH,
    STOP,
    TIMEOUT,
    Done,
    EngineBusy,
    EngineClosed,
    EngineError,
    InputTooLong,
    Stats,
    Token,
)
from llm.engine.llamacpp import LlamaCppEngine
from llm.engine.prompts import Prompt
from llm.prompting import Turn

__all__ = [
    "BACKENDS",
    "CANCELLED",
    "CURRENT",
    "ERROR",
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
    "InputTooLong",
    "LlamaCppEngine",
    "Prompt",
    "Request",
    "Stats",
    "Token",
    "Turn",
    "choose_backend",
    "make_engine",
]
