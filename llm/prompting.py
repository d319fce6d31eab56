"""The one place that turns a conversation into model text.

Training export and the inference engine both call `render_conversation`, so what the model
saw while training is exactly what it sees while serving (train/serve skew is the classic
silent bug). Pure Python: no Django, no torch.

The format uses Gemma's turn markers, which the embedded base model knows as special tokens
and which the tiny test model's tokenizer declares as special tokens too:

    <start_of_turn>user
    如何退货？<end_of_turn>
    <start_of_turn>model
    您好！退货流程如下：...<end_of_turn>

A system prompt, when there is one, opens the first user turn (Gemma has no system role).
"""

from dataclasses import dataclass

START = "<start_of_turn>"
END = "<end_of_turn>"
ROLES = {"user": "user", "assistant": "model"}


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


def question_text(instruction, input_text=""):
    """Alpaca's instruction + optional input, as the customer's message."""
    instruction = instruction.strip()
    input_text = (input_text or "").strip()
    return f"{instruction}\n{input_text}" if input_text else instruction


def render_conversation(turns, *, system="", add_generation_prompt=True):
    """Render turns into model text.

    With add_generation_prompt the text ends with an open model turn, ready for generation;
    the model's answer is expected to end with END (its end-of-turn token).
    """
    parts = []
    for index, turn in enumerate(turns):
        if turn.role not in ROLES:
            raise ValueError(f"unknown role {turn.role!r}; expected one of {sorted(ROLES)}")
        text = turn.text.strip()
        if index == 0 and system.strip():
            if turn.role != "user":
                raise ValueError("a conversation with a system prompt must start with a user turn")
            text = f"{system.strip()}\n\n{text}"
        parts.append(f"{START}{ROLES[turn.role]}\n{text}{END}\n")
    if add_generation_prompt:
        parts.append(f"{START}model\n")
    return "".join(parts)


def render_training_example(instruction, input_text, output, *, system=""):
    """Split one Q&A pair into (prompt, completion) for training.

    prompt + completion equals render_conversation of the same two turns; the loss is taken
    on the completion only, which ends with END so the model learns to stop.
    """
    prompt = render_conversation([Turn("user", question_text(instruction, input_text))], system=system)
    completion = f"{output.strip()}{END}\n"
    return prompt, completion
