"""The one place that turns a conversation into model text.

Training export and the inference engine both call `render_conversation`, so what the model
saw while training is exactly what it sees while serving (train/serve skew is the classic
silent bug). Pure Python: no Django, no torch.

The text has one of two formats, a `PromptFormat` chosen per checkpoint by `train()` and
recorded with the adapter it writes:

- `chat_template`: the checkpoint's own chat template (Qwen, Llama, ChatGLM3 instruct models
  ship one in their tokenizer), rendered by the tokenizer; the model already knows its markers.
- `gemma`: the built-in format, for checkpoints without a template (the embedded Gemma-3-270M
  base, the tiny test model). It uses Gemma's turn markers, which the base model knows as special
  tokens and which the tiny model's tokenizer declares as special tokens too:

      <start_of_turn>user
      如何退货？<end_of_turn>
      <start_of_turn>model
      您好！退货流程如下：...<end_of_turn>

  A system prompt, when there is one, opens the first user turn (Gemma has no system role).

An adapter trained before the format was recorded was trained on the Gemma format, and
`read_prompt_format` says so. The engine serves an adapter with:

    prompt_format = read_prompt_format(adapter_dir)
    text = render_conversation(turns, system=system, prompt_format=prompt_format, tokenizer=tokenizer)
    ids = encode_prompt(tokenizer, text, prompt_format)
"""

import enum
from dataclasses import dataclass

from jinja2 import TemplateError

from llm.finetune.config import read_saved_record

START = "<start_of_turn>"
END = "<end_of_turn>"
ROLES = {"user": "user", "assistant": "model"}


class PromptFormat(enum.StrEnum):
    GEMMA = "gemma"  # the built-in turn markers above
    CHAT_TEMPLATE = "chat_template"  # the tokenizer's own chat template

    @property
    def adds_special_tokens(self):
        """Whether the tokenizer adds its special tokens (BOS) when encoding the rendered text.

        A chat template writes its own (Gemma's and Llama's templates start with the BOS token):
        encoding that text with them again would double the BOS, so it is encoded without, as
        transformers' apply_chat_template(tokenize=True) does.
        """
        return self is PromptFormat.GEMMA


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


def question_text(instruction, input_text=""):
    """Alpaca's instruction + optional input, as the customer's message."""
    instruction = instruction.strip()
    input_text = (input_text or "").strip()
    return f"{instruction}\n{input_text}" if input_text else instruction


def prompt_format_for(tokenizer):
    """The format a checkpoint is trained and served with: its chat template when it has one."""
    return PromptFormat.CHAT_TEMPLATE if getattr(tokenizer, "chat_template", None) else PromptFormat.GEMMA


def read_prompt_format(adapter_dir):
    """The format an adapter was trained with; Gemma for adapters trained before it was recorded."""
    recorded = read_saved_record(adapter_dir).get("prompt_format")
    return PromptFormat(recorded) if recorded else PromptFormat.GEMMA


def render_conversation(turns, *, system="", add_generation_prompt=True, prompt_format=PromptFormat.GEMMA, tokenizer=None):
    """Render turns into model text in `prompt_format` (the chat template needs the tokenizer).

    With add_generation_prompt the text ends with an open model turn, ready for generation;
    the model's answer is expected to end with its end-of-turn token (see llm.generation).
    """
    for turn in turns:
        if turn.role not in ROLES:
            raise ValueError(f"unknown role {turn.role!r}; expected one of {sorted(ROLES)}")
    if PromptFormat(prompt_format) is PromptFormat.CHAT_TEMPLATE:
        return _render_with_template(turns, system, add_generation_prompt, tokenizer)
    parts = []
    for index, turn in enumerate(turns):
        text = turn.text.strip()
        if index == 0 and system.strip():
            text = _with_system(system, turn)
        parts.append(f"{START}{ROLES[turn.role]}\n{text}{END}\n")
    if add_generation_prompt:
        parts.append(f"{START}model\n")
    return "".join(parts)


def _with_system(system, first_turn):
    """The first turn's text opened by the system prompt, for formats without a system role."""
    if first_turn.role != "user":
        raise ValueError("a conversation with a system prompt must start with a user turn")
    return f"{system.strip()}\n\n{first_turn.text.strip()}"


def _render_with_template(turns, system, add_generation_prompt, tokenizer):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the chat_template prompt format needs the checkpoint's tokenizer, with a chat template")
    messages = [{"role": turn.role, "content": turn.text.strip()} for turn in turns]

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    if not system.strip():
        return render(messages)
    try:
        return render([{"role": "system", "content": system.strip()}, *messages])
    except TemplateError:
        # Templates of models without a system role (Mistral's, for one) raise on it: the prompt
        # then opens the first user turn, as in the Gemma format.
        return render([{"role": "user", "content": _with_system(system, turns[0])}, *messages[1:]])


def encode_prompt(tokenizer, text, prompt_format):
    """Token ids of rendered text, with the special tokens the format leaves to the tokenizer."""
    return tokenizer(text, add_special_tokens=PromptFormat(prompt_format).adds_special_tokens)["input_ids"]


def render_training_example(instruction, input_text, output, *, system="", prompt_format=PromptFormat.GEMMA, tokenizer=None):
    """Split one Q&A pair into (prompt, completion) for training.

    prompt is what the engine renders to ask the question; prompt + completion equals
    render_conversation of the question and its answer. The loss is taken on the completion,
    whose answer ends with the format's end-of-turn marker so that the model learns to stop.
    """
    question = Turn("user", question_text(instruction, input_text))
    options = {"system": system, "prompt_format": prompt_format, "tokenizer": tokenizer}
    prompt = render_conversation([question], **options)
    full = render_conversation([question, Turn("assistant", output)], add_generation_prompt=False, **options)
    if not full.startswith(prompt):
        # Answer-only labels need the served prompt to be a prefix of the trained text.
        raise ValueError("this chat template renders a question differently once it has an answer; it cannot be trained")
    return prompt, full[len(prompt) :]
