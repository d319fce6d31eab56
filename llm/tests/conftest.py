"""Fixtures the llm tests share (the root conftest.py has the model and adapter fixtures).

`records` is the engine tests' question set; a module that needs other questions defines its
own `records`, which takes precedence over this one.
"""

import json

import pytest


@pytest.fixture(scope="module")
def records():
    """Eight records of data/train.json, every 14th: spread over the categories."""
    with open("data/train.json", encoding="utf-8") as f:
        return json.load(f)[::14][:8]


@pytest.fixture
def engines():
    """A list to append engines to; every engine in it is closed after the test."""
    made = []
    yield made
    for engine in made:
        engine.close()
