"""The chat inference engine: a pure module, no Django.

    from chat.engine import Engine, EngineConfig, Turn, Token, Done, EngineBusy, InputTooLong
    engine = make_engine(config, "auto")   # Engine (transformers) or LlamaCppEngine (llama.cpp)

Both backends keep one contract, `chat.engine.base.BaseEngine`: how requests are admitted,
streamed, cancelled and swapped between adapters. `chat.engine.engine` is the transformers side,
`chat.engine.llamacpp` the llama.cpp side, `chat.engine.backends` chooses between them. Importing
this package imports neither torch nor llama_cpp; `load()` (or the first request) does.
"""

from chat.engine.backends import BACKENDS, BackendUnavailable, choose_backend, make_engine
from chat.engine.base import CURRENT, Request
from chat.engine.config import EngineConfig
from chat.engine.engine import Engine
from chat.engine.events import (
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
from chat.engine.llamacpp import LlamaCppEngine
from chat.engine.prompts import Prompt
from training.prompting import Turn

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
