"""Fit a conversation into the prompt budget, rendered by the one renderer training uses, in
the prompt format the answering adapter was trained on (llm.prompting.PromptFormat).

The oldest turns go first; the system prompt and the newest user message always stay. A new
message that cannot fit even alone is refused (InputTooLong) rather than cut: a cut question
gets a confident answer to something the customer did not ask.
"""

from dataclasses import dataclass

from llm.engine.events import InputTooLong
from llm.prompting import PromptFormat, Turn, encode_prompt, render_conversation

# Turns older than this many characters per budget token are dropped without tokenising them:
# a token is rarely more than 4 characters, so such a suffix cannot fit anyway.
HISTORY_CHARS_PER_TOKEN = 8


@dataclass(frozen=True)
class Prompt:
    text: str  # exactly what render_conversation returns for the kept turns
    ids: list  # token ids, special tokens (BOS) included as in training
    dropped_turns: int  # how many of the oldest turns were left out
    prompt_format: PromptFormat = PromptFormat.GEMMA  # the format text is in


def as_turns(history):
    """Accept a list of Turn (or {"role", "text"} dicts), or one string as a single user message."""
    if isinstance(history, str):
        return [Turn("user", history)]
    turns = [turn if isinstance(turn, Turn) else Turn(turn["role"], turn["text"]) for turn in history]
    if not turns or turns[-1].role != "user":
        raise ValueError("a conversation to answer must end with a user turn")
    return turns


def fit_conversation(tokenizer, history, *, system, max_tokens, max_message_chars, prompt_format):
    """Render the longest suffix of `history` whose tokens fit `max_tokens` in `prompt_format`;
    returns a Prompt."""
    turns = as_turns(history)
    message = turns[-1].text.strip()
    if len(message) > max_message_chars:
        raise InputTooLong(
            f"the message has {len(message)} characters; the limit is {max_message_chars}",
            limit=max_message_chars, size=len(message), unit="characters",
        )

    def encode(start):
        text = render_conversation(turns[start:], system=system, prompt_format=prompt_format, tokenizer=tokenizer)
        return text, encode_prompt(tokenizer, text, prompt_format)

    # A kept conversation must open with a user turn (the system prompt goes into it).
    starts = [i for i, turn in enumerate(turns) if turn.role == "user"]
    char_limit = HISTORY_CHARS_PER_TOKEN * max_tokens + len(system)
    suffix_chars = 0
    cheap = len(starts) - 1
    for index in range(len(turns) - 1, -1, -1):
        suffix_chars += len(turns[index].text)
        if suffix_chars > char_limit:
            break
        if turns[index].role == "user":
            cheap = starts.index(index)
    # Fewer turns never take more tokens, so binary-search the first start that fits.
    low, high = cheap, len(starts) - 1
    text, ids = encode(starts[high])
    if len(ids) > max_tokens:
        raise InputTooLong(
            f"the message takes {len(ids)} tokens with the system prompt; the limit is {max_tokens}",
            limit=max_tokens, size=len(ids), unit="tokens",
        )
    best = (starts[high], text, ids)
    while low < high:
        middle = (low + high) // 2
        text, ids = encode(starts[middle])
        if len(ids) <= max_tokens:
            best, high = (starts[middle], text, ids), middle
        else:
            low = middle + 1
    start, text, ids = best
    return Prompt(text=text, ids=ids, dropped_turns=start, prompt_format=PromptFormat(prompt_format))
