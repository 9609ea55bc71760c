"""Helpers of the data tests (imported by conftest.py and the tests): a tiny tokenizer, images, JSONL."""

import io
import json
import os
import re

import numpy as np
import tokenizers
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers


class CharTokenizer:
  """Byte-level fixture tokenizer with the interface of docs/ARCHITECTURE.md ("Tokens").

  ids: 0 pad, 1 BOS, 2 EOS, 3..258 the UTF-8 bytes; V = 259; `<image>` = 259, `<EOC>` = 260.
  """

  pad_id, bos_id, eos_id = 0, 1, 2
  image_id, eoc_id = 259, 260
  vocab_size = 261
  _OFFSET = 3
  _SPECIAL = re.compile(r"(<image>|<EOC>)")

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self._SPECIAL.split(text):
      if piece == "<image>":
        ids.append(self.image_id)
      elif piece == "<EOC>":
        ids.append(self.eoc_id)
      else:
        ids += [b + self._OFFSET for b in piece.encode("utf-8")]
    return ids

  def decode(self, ids) -> str:
    out, raw = [], bytearray()
    names = {
      self.pad_id: "<pad>",
      self.bos_id: "<BOS>",
      self.eos_id: "<EOS>",
      self.image_id: "<image>",
      self.eoc_id: "<EOC>",
    }
    for i in (int(i) for i in ids):
      if i in names:
        out.append(raw.decode("utf-8", "replace") + names[i])
        raw = bytearray()
      else:
        raw.append(i - self._OFFSET)
    return "".join(out) + raw.decode("utf-8", "replace")


def image_bytes(mode: str = "RGB", size=(20, 12), fmt: str = "PNG", seed: int = 0) -> bytes:
  """An encoded random image of `mode` (RGB, L, RGBA, LA, P, CMYK, I;16)."""
  rng = np.random.default_rng(seed)
  w, h = size
  if mode == "I;16":
    image = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
  else:
    rgb = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    image = rgb.convert(mode)
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


def write_jsonl(path, records) -> str:
  """Writes records (dicts, or raw strings written as they are) one per line; returns the path."""
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def byte_tokenizer_json(directory) -> str:
  """Writes a byte-level BPE without merges (V = 257: 256 bytes + <|endoftext|>) as an HF
  tokenizer.json in `directory`; returns its path (a model with lm.vocab_size = 257 reads its ids)."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab["<|endoftext|>"] = len(alphabet)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, f)
  return os.path.join(directory, "tokenizer.json")
