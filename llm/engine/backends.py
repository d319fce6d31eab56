"""Which inference backend serves, and why: transformers (any checkpoint, GPU) or llama.cpp (GGUF, CPU).

    engine = make_engine(config, "auto")     # a TransformersEngine or a LlamaCppEngine, loaded on first use
    engine.backend, engine.backend_reason    # "llamacpp", "auto: a CPU-only host and ... has a GGUF ..."

`auto` takes llama.cpp on a CPU-only host when the base checkpoint has a GGUF beside it (found by
`llm.basemodel.describe_checkpoint`), llama-cpp-python imports, and no explicit dtype was
configured (a dtype such as float32 is one only transformers can honour; llama.cpp serves the
GGUF's own quantisation). Otherwise transformers, and one log line says why. An explicit
"llamacpp" that cannot be served is a BackendUnavailable when the engine is made, not a
surprise at the first chat. Nothing here imports Django.
"""

import logging

from llm.engine.events import BackendUnavailable
from llm.engine.llamacpp import LlamaCppEngine, base_gguf
from llm.engine.openai import OpenAIEngine
from llm.engine.transformers import TransformersEngine

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "llamacpp", "worker", "openai")

__all__ = ["BACKENDS", "BackendUnavailable", "base_gguf", "choose_backend", "llamacpp_problem", "make_engine"]


def llamacpp_problem():
    """Why llama-cpp-python cannot be used here, or None when it imports."""
    try:
        import llama_cpp  # noqa: F401  (loads the shared library: the real test)
    except (ImportError, OSError, RuntimeError) as error:  # OSError, RuntimeError: a library that fails to load
        return f"llama-cpp-python cannot be imported ({type(error).__name__}: {error})"
    return None


def _gpu(device):
    if device != "auto":
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def choose_backend(requested, config):
    """(backend, reason) for `requested` in BACKENDS on this host; raises BackendUnavailable."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {requested!r}")
    if requested == "transformers":
        return "transformers", "configured: transformers"
    if requested == "worker":
        return "worker", "configured: a dedicated inference worker answers through the channel layer"
    if requested == "openai":
        if not config.remote_url:
            raise BackendUnavailable("the openai backend needs the server's URL (CSP_OPENAI_BASE_URL)")
        return "openai", f"configured: the OpenAI-compatible server at {config.remote_url}"
    gguf = base_gguf(config.base_dir)
    if requested == "llamacpp":
        problem = llamacpp_problem()
        if problem is None and gguf is None:
            problem = f"the base model {str(config.base_dir)!r} has no GGUF file (*.gguf or gguf/*.gguf)"
        if problem:
            raise BackendUnavailable(f"the llamacpp backend cannot serve: {problem}")
        return "llamacpp", f"configured: llamacpp, serving {gguf.name}"
    if _gpu(config.device):
        backend, reason = "transformers", "auto: a CUDA GPU serves through transformers"
    elif gguf is None:
        backend, reason = "transformers", "auto: the base model has no GGUF file for llama.cpp"
    elif config.dtype != "auto":
        backend, reason = "transformers", f"auto: dtype {config.dtype} is configured, which only transformers honours"
    elif problem := llamacpp_problem():
        logger.warning("inference backend: transformers, not llama.cpp: %s", problem)
        return "transformers", f"auto: {problem}"
    else:
        backend, reason = "llamacpp", f"auto: a CPU-only host and the base model has a GGUF ({gguf.name})"
    logger.info("inference backend: %s (%s)", backend, reason)
    return backend, reason


def make_engine(config, backend="auto", *, worker_class=None):
    """The engine of the chosen backend (nothing loaded yet), with `backend_reason` set.

    `worker` is an engine of the Django side (it talks to the inference worker through the channel
    layer), so its caller passes the class: this package never imports an app."""
    name, reason = choose_backend(backend, config)
    if name == "llamacpp":
        engine_class = LlamaCppEngine
    elif name == "worker":
        if worker_class is None:
            raise BackendUnavailable("the worker backend is served by the Django side (chat.serving)")
        engine_class = worker_class
    elif name == "openai":
        engine_class = OpenAIEngine
    else:
        engine_class = TransformersEngine
    engine = engine_class(config)
    engine.backend_reason = reason
    return engine
