"""Factories for the knowledge app's tests (STYLE.md rule 15): plain functions, saved rows."""

import itertools

from knowledge.models import Category, QAPair

_numbers = itertools.count(1)


def make_category(name=None, **fields):
    return Category.objects.create(name=name or f"分类{next(_numbers)}", **fields)


def make_pair(instruction=None, output=None, **fields):
    """A saved pair; each call gets its own question unless one is given."""
    number = next(_numbers)
    return QAPair.objects.create(
        instruction=instruction or f"用户问：第{number}号问题怎么办？",
        output=output or f"第{number}号问题的答案：请在7天内联系客服。",
        **fields,
    )
