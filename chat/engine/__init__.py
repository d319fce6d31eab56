"""The chat inference engine (transformers backend): a pure module, no Django.

    from chat.engine import Engine, EngineConfig, Turn, Token, Done, EngineBusy, InputTooLong

See `chat.engine.engine` for how requests are batched, streamed, cancelled and swapped between
adapters. Importing this package does not import torch; `Engine.load()` (or the first request) does.
"""

from chat.engine.config import EngineConfig
from chat.engine.engine import CURRENT, Engine, Request
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
from chat.engine.prompts import Prompt
from training.prompting import Turn

__all__ = [
    "CANCELLED",
    "CURRENT",
    "ERROR",
    "FINISH_REASONS",
    "LENGTH",
    "STOP",
    "TIMEOUT",
    "Done",
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "InputTooLong",
    "Prompt",
    "Request",
    "Stats",
    "Token",
    "Turn",
]
