"""The inference engine's settings: one flat dataclass with commented defaults.

The Django side builds it from settings (it is the only reader of the environment) and hands it
to `Engine`; nothing here imports Django or torch.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from llm.engine.guard import MIN_CANARY_CHARS, normalise

DTYPES = ("auto", "bfloat16", "float16", "float32")
# ggml types llama.cpp may requantise the output layer to (EngineConfig.head_type): the 32-value
# block types, which fit Gemma-3-270M's rows of 640 (K-quants need rows of 256).
HEAD_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


@dataclass
class EngineConfig:
    # model
    base_dir: str | Path = ""  # a local Hugging Face checkpoint directory; nothing is downloaded
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    # "auto" picks the fastest dtype that is correct on the hardware: bfloat16 on CUDA with bf16 and
    # on CPUs with AVX-512 bf16 (decode is memory-bound: half the bytes per weight, ~2x tokens/s),
    # else float32 (emulated bf16 on older CPUs is slower than fp32). The engine reports its choice.
    dtype: str = "auto"
    trust_remote_code: bool = False  # only for models like ChatGLM3 that ship their own code
    # prompt
    system_prompt: str = ""  # used when neither the caller nor the adapter's training config gives one
    # The leak guard (llm.engine.guard): an answer about to print guard_min_run characters in a row
    # of its system prompt, or a whole canary, ends "filtered" and the held text is never sent.
    canaries: tuple = ()  # secrets no answer may print (CSP_CHAT_CANARIES), besides the system prompt
    guard_min_run: int = 24  # normalised characters; 0 turns the guard off (to measure the raw model)
    max_input_tokens: int = 1024  # prompt budget; older turns are dropped first, the system prompt is kept
    # A message longer than this many characters per input token is refused before tokenising:
    # no tokenizer call is spent on a pasted novel (a token is rarely more than 4 characters).
    chars_per_token: int = 4
    # generation: server caps; a client may ask for less, never for more
    max_new_tokens: int = 256
    temperature: float = 0.0  # default; 0 = greedy (the answer the adapter memorised)
    max_temperature: float = 1.5  # client temperatures are clamped to [0, max_temperature]
    top_p: float = 1.0  # default nucleus mass, in (0, 1]
    max_seconds: float = 60.0  # wall-clock cap per answer, from submission; ends with reason "timeout"
    # concurrency (FastChat's semaphore, with a queue in front of it)
    max_active: int = 8  # K: sequences decoded together, one forward per step for all of them
    max_waiting: int = 32  # Q: admitted but not yet decoding; beyond K + Q a request gets EngineBusy
    # Prompt tokens processed per loop iteration: a long prompt is prefilled in chunks between decode
    # steps, so it stalls the streams already running by one chunk's time, not the whole prompt's.
    prefill_chunk: int = 256
    # Prompt-lookup drafting (llm.engine.drafting): a greedy answer's next tokens are guessed from
    # its prompt (the retrieved curated answers, the conversation) and up to this many are
    # verified in the same forward as its next token; 0 turns drafting off. Sampled answers and
    # picks always decode one token per step. The answer is the same token for token in float32
    # (tested); in bf16, or quantised on llama.cpp, a near-tie can split between a one-token and
    # a several-token forward (as it already can between a chat alone and in a batch).
    draft_tokens: int = 8
    # llama.cpp backend: compute threads (0 = one per core, os.cpu_count()); transformers uses torch's.
    threads: int = 0
    # llama.cpp's extra weight buffers (AMX tiles, repacked CPU layouts): "on", "off", or "auto" =
    # on unless the CPU advertises AMX. Virtual machines may advertise AMX and grant the tile
    # permission yet fault on the first tile instruction (measured: SIGILL, the whole process
    # gone, on a 2-core Xeon VM); llama.cpp's own switch covers both kinds, so AMX CPUs lose the
    # repacked layouts too unless this is "on".
    extra_buffers: str = "auto"
    # llama.cpp's output layer: "" = the GGUF as shipped, else one of HEAD_TYPES, served from a copy
    # of the GGUF with token_embd/output requantised to it (llm.engine.llamacpp.gguf_with_head; made
    # once, beside the original). Gemma-3-270M ties it to the token embedding, 262144 x 640 in Q8_0:
    # there llama.cpp's several-row product costs 3-4x a one-row one, so 2 chats decoded slower in
    # aggregate than 1; a q4_0 copy removed the dip and made one chat ~1.7x faster in the bare
    # model (benchmarks/batch_shapes.py), but only ~1.04x in the engine with a LoRA version active
    # (benchmarks/drafting.py --head-type), and greedy answers change, so it is off unless chosen.
    head_type: str = ""
    # openai backend: an OpenAI-compatible server (vLLM) that serves the base model under
    # `remote_base_model` and each adapter version under its own name ("v3").
    remote_url: str = ""  # e.g. "http://gpu-host:8000/v1"
    remote_api_key: str = ""
    remote_base_model: str = "base"

    def __post_init__(self):
        if self.extra_buffers not in ("auto", "on", "off"):
            raise ValueError(f"extra_buffers must be auto, on or off, not {self.extra_buffers!r}")
        if self.head_type and self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be empty (the GGUF as shipped) or one of {HEAD_TYPES}, not {self.head_type!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        for name in ("max_input_tokens", "max_new_tokens", "max_active", "prefill_chunk", "chars_per_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        self.canaries = tuple(self.canaries)
        short = [c for c in self.canaries if len(normalise(c)) < MIN_CANARY_CHARS]
        if short:
            raise ValueError(
                f"canaries need at least {MIN_CANARY_CHARS} letters or digits (a shorter one stops ordinary answers): {short!r}"
            )
        if self.guard_min_run < 0:
            raise ValueError(f"guard_min_run must be 0 (off) or more, not {self.guard_min_run!r}")
        if self.draft_tokens < 0:
            raise ValueError(f"draft_tokens must be 0 (off) or more, not {self.draft_tokens!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (every core) or more, not {self.threads!r}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, not {self.max_waiting!r}")
        if not (self.max_seconds > 0):
            raise ValueError(f"max_seconds must be positive, not {self.max_seconds!r}")
        if not (0 <= self.max_temperature and math.isfinite(self.max_temperature)):
            raise ValueError(f"max_temperature must be a finite number >= 0, not {self.max_temperature!r}")
        if not (0 <= self.temperature <= self.max_temperature):
            raise ValueError(f"temperature must be in [0, {self.max_temperature}], not {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")

    @property
    def max_message_chars(self):
        return self.chars_per_token * self.max_input_tokens


def clamp_limits(config, max_new_tokens, temperature, top_p):
    """A client's (max_new_tokens, temperature, top_p), None for the defaults, clamped to the
    server's caps; ValueError for what no clamp can mend. Remote engines apply it too."""
    max_new_tokens = config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    temperature = config.temperature if temperature is None else float(temperature)
    top_p = config.top_p if top_p is None else float(top_p)
    if math.isnan(temperature) or math.isnan(top_p) or top_p <= 0:
        raise ValueError(f"temperature must be a number and top_p in (0, 1]; got {temperature}, {top_p}")
    return (
        min(max_new_tokens, config.max_new_tokens),
        min(max(temperature, 0.0), config.max_temperature),
        min(top_p, 1.0),
    )
