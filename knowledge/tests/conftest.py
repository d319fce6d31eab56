"""Fixtures shared by the knowledge app's tests."""

import pytest

from knowledge import retrieval


@pytest.fixture
def fresh_process(monkeypatch):
    """This process as if just started: no serving index built yet, no vectors in memory."""
    monkeypatch.setattr(retrieval, "_serving", None)
    monkeypatch.setattr(retrieval, "_serving_cache", None)
