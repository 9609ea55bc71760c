"""Shared fixtures of the data tests: the tiny tokenizer, image files (good and bad), a data_dir.

Helpers (tokenizer class, image and JSONL writers) live in `data_helpers.py`.
"""

import numpy as np
import pytest

from tests.data.data_helpers import CharTokenizer, image_bytes


@pytest.fixture(scope="session")
def tokenizer():
  return CharTokenizer()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
  """A folder of image files: good ones in several modes, and bad ones.

  good.png, gray.png, rgba.png, palette.png, la.png, cmyk.jpg, gray16.png, wide.jpg, f0..f3.png;
  bad: empty.png (0 bytes), corrupt.png (random bytes), truncated.png (half a PNG); missing.png
  does not exist.
  """
  d = tmp_path_factory.mktemp("media")
  files = {
    "good.png": image_bytes("RGB"),
    "gray.png": image_bytes("L"),
    "rgba.png": image_bytes("RGBA"),
    "palette.png": image_bytes("P"),
    "la.png": image_bytes("LA"),
    "cmyk.jpg": image_bytes("CMYK", fmt="JPEG"),
    "gray16.png": image_bytes("I;16"),
    "wide.jpg": image_bytes("RGB", (40, 10), "JPEG"),
    "empty.png": b"",
    "corrupt.png": np.random.default_rng(1).bytes(300),
    "truncated.png": image_bytes("RGB", (64, 64))[:200],
  }
  for t in range(4):
    files[f"f{t}.png"] = image_bytes("RGB", seed=10 + t)
  for name, data in files.items():
    (d / name).write_bytes(data)
  return d


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the session (datasets are built once)."""
  return str(tmp_path_factory.mktemp("tfds"))
