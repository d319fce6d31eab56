"""Helpers the llm tests share that are plain functions, not fixtures."""

from llm.prompting import question_text


def question(record):
    """A data/train.json record's customer question (instruction + input), as a customer asks it."""
    return question_text(record["instruction"], record["input"])
