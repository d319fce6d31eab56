"""Q&A records as training examples: the served prompt, then the answer, labelled answer-only."""

import random

import torch

from llm.generation import end_of_turn_id
from llm.prompting import PromptFormat, encode_prompt, render_training_example

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips (prompt and padding)


def encode_example(tokenizer, record, config, prompt_format=PromptFormat.GEMMA):
    """Tokenise one Q&A record as prompt + answer with labels on the answer only.

    The prompt's ids are exactly what the engine feeds the model for the question. Returns
    dict(input_ids, labels, truncated), or None when truncation left no answer token.
    """
    answer = record["output"].strip()
    prompt, completion = render_training_example(
        record["instruction"], record.get("input", ""), answer,
        system=config.system_prompt, prompt_format=prompt_format, tokenizer=tokenizer,
    )
    # The answer's last id must be the end-of-turn id itself: it is what generation stops on.
    # What the format writes after it (a newline, the next turn) is not the answer's to learn;
    # what a template writes before the answer in the model's turn is.
    answer_at = completion.find(answer)
    if answer_at < 0:
        raise ValueError("the chat template rewrites answers, so its rendered answers cannot be labelled")
    answer_text = completion[: answer_at + len(answer)]
    prompt_ids = encode_prompt(tokenizer, prompt, prompt_format)
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer, prompt_format)]
    input_ids = (prompt_ids + answer_ids)[: config.max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[: config.max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    truncated = len(prompt_ids) + len(answer_ids) > config.max_length
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def collate(examples, pad_id):
    """Pad a batch to its longest example (dynamic padding); padding gets no loss."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids, labels, attention = [], [], []
    for example in examples:
        pad = width - len(example["input_ids"])
        input_ids.append(example["input_ids"] + [pad_id] * pad)
        labels.append(example["labels"] + [IGNORE_INDEX] * pad)
        attention.append([1] * len(example["input_ids"]) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(attention),
    }


def length_grouped_batches(lengths, batch_size, seed):
    """Batches of indices whose examples have similar lengths, in a seeded random order.

    Shuffle, then sort within windows of 16 batches: padding stays small, and the batches
    still differ between epochs (the seed includes the epoch).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
