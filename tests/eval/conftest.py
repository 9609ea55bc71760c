"""Shared fixtures of the evaluation tests."""

import pytest

from tests.data.data_helpers import CharTokenizer


@pytest.fixture(scope="module")
def tok():
  """The byte-level fixture tokenizer (V = 261 with `<image>` and `<EOC>`)."""
  return CharTokenizer()
