"""Tokenizer tests: ids against an independent pure-Python byte-level BPE over the GGUF vocab."""

import unicodedata

import pytest

from flamingo_jax.convert import gguf_lm
from flamingo_jax.data import tokenizer as tokenizer_lib

# -- An independent reference: GPT-2 byte-level BPE written from its definition ---------------


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map."""
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


def _is_letter(c):
  return unicodedata.category(c).startswith("L")


def _is_number(c):
  return unicodedata.category(c).startswith("N")


def _is_other(c):
  return not (c.isspace() or _is_letter(c) or _is_number(c))


def _gpt2_match(s: str, i: int) -> int:
  """Length of the GPT-2 regex match at s[i:], the alternatives tried in order:
  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
  n = len(s)
  for suffix in ("s", "t", "re", "ve", "m", "ll", "d"):
    if s.startswith("'" + suffix, i):
      return 1 + len(suffix)
  for cls in (_is_letter, _is_number, _is_other):
    j = i + 1 if (s[i] == " " and i + 1 < n and cls(s[i + 1])) else i
    k = j
    while k < n and cls(s[k]):
      k += 1
    if k > j:
      return k - i
  k = i
  while k < n and s[k].isspace():
    k += 1
  if k == n or k - i == 1:  # \s+ to the end, or the \s+ fallback for one space before \S.
    return k - i
  return k - i - 1  # \s+(?!\S): leave the last space to the next word.


class PurePythonBPE:
  """llama.cpp's 'smollm' pre-tokenizer + byte-level BPE, from the GGUF token list and merges."""

  def __init__(self, tokens, merges, specials):
    self.vocab = {t: i for i, t in enumerate(tokens)}
    self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    self.specials = sorted(specials, key=len, reverse=True)
    self.byte_map = _bytes_to_unicode()

  def _bpe(self, word: str) -> list[str]:
    parts = list(word)
    while len(parts) > 1:
      pairs = [(self.ranks.get(p, float("inf")), p) for p in zip(parts, parts[1:])]
      rank, best = min(pairs)
      if rank == float("inf"):
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _pieces(self, text: str):
    """Digits one by one (\\p{N}), then GPT-2 regex pieces of the rest."""
    segment = ""
    for c in text + "\0":
      if c == "\0" or _is_number(c):
        i = 0
        while i < len(segment):
          length = _gpt2_match(segment, i)
          yield segment[i : i + length]
          i += length
        segment = ""
        if c != "\0":
          yield c
      else:
        segment += c

  def encode(self, text: str) -> list[int]:
    ids, i, plain = [], 0, ""
    while i <= len(text):
      special = next((s for s in self.specials if text.startswith(s, i)), None)
      if special is None and i < len(text):
        plain += text[i]
        i += 1
        continue
      for piece in self._pieces(plain):
        word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
        ids.extend(self.vocab[p] for p in self._bpe(word))
      plain = ""
      if special is None:
        break
      ids.append(self.vocab[special])
      i += len(special)
    return ids


TEXTS = [
  "Hello world!",
  "12345",
  "In 2024, 3.14159 > 2e10; 007 agents",
  "naïve café, Straße, Ærø, ĳ",
  "日本語のテキスト、中文字符",
  "emoji 🙂👍🏽 and symbols ©®™ ½ ² ٣٤",
  "    four leading spaces, two between  words, trailing   ",
  "line one\nline two\n\n\nthree newlines\r\nwindows\ttab\t\tdouble tab",
  "don't I'll we've they're she'd it's I'M",
  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
  "def f(x):\n    return x**2  # comment\n",
  "e\u0301 combining, \u00a0nbsp, a\u2003em space",
  "",
  " ",
  "\n",
]


@pytest.fixture(scope="module")
def gguf_reader():
  reader, _ = gguf_lm.open_gguf(gguf_lm.smollm2_gguf_path())
  return reader


@pytest.fixture(scope="module")
def tok(gguf_reader):
  return tokenizer_lib.Tokenizer.from_gguf(gguf_reader)


@pytest.fixture(scope="module")
def reference(gguf_reader):
  fields = gguf_reader.fields
  tokens = fields["tokenizer.ggml.tokens"].contents()
  types = fields["tokenizer.ggml.token_type"].contents()
  specials = [t for t, ty in zip(tokens, types) if ty == 3]
  return PurePythonBPE(tokens, fields["tokenizer.ggml.merges"].contents(), specials)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_pure_python_bpe(tok, reference, text):
  assert tok.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_known_ids(tok):
  assert tok.encode("12345") == [33, 34, 35, 36, 37]  # '0' is id 32: one id per digit.
  ids = [tok.token_to_id(t) for t in ("<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>")]
  assert ids[0] == 1 and ids[-1] == 2 and ids[2] == 198  # 'Ċ' is '\n' as a byte-level character.
  assert tok.encode("<|im_start|>user\nHi<|im_end|>") == ids
  assert tok.encode("Hello") == [tok.token_to_id("Hello")]


def test_special_ids(tok):
  assert tok.base_vocab_size == 49152
  assert tok.vocab_size == 49154
  assert (tok.image_id, tok.eoc_id) == (49152, 49153)
  assert tok.id_to_token(tok.bos_id) == "<|endoftext|>"  # SmolLM2 has no BOS: document separator.
  assert tok.id_to_token(tok.eos_id) == "<|im_end|>"
  assert tok.pad_id == tok.eos_id
  assert not tok.add_bos


def test_extra_tokens_are_single_ids(tok):
  ids = tok.encode("<image>Output: a cat<EOC>")
  assert ids[0] == tok.image_id and ids[-1] == tok.eoc_id
  assert ids[1:-1] == tok.encode("Output: a cat")
  assert tok.decode(ids) == "<image>Output: a cat<EOC>"
  assert tok.decode(ids, skip_special=True) == "Output: a cat"
  assert tok.encode("a<image>b") == tok.encode("a") + [tok.image_id] + tok.encode("b")


def test_no_bos_prepended(tok):
  assert tok.encode("a") == [tok.token_to_id("a")]


def test_from_hf_matches_gguf(tok, tmp_path):
  tok.save_hf(str(tmp_path))
  hf = tokenizer_lib.Tokenizer.from_hf(str(tmp_path / "tokenizer.json"))
  for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "image_id", "eoc_id", "chat_template"):
    assert getattr(hf, attr) == getattr(tok, attr), attr
  for text in TEXTS + ["<image>x<EOC>"]:
    assert hf.encode(text) == tok.encode(text)


def test_chatml_matches_smollm2_template(tok):
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
  # The GGUF's jinja template, rendered by hand for these messages.
  expected = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
  )
  got = tokenizer_lib.chatml(
    messages, add_generation_prompt=True, default_system=tokenizer_lib.SMOLLM2_DEFAULT_SYSTEM
  )
  assert got == expected
  assert tokenizer_lib.SMOLLM2_DEFAULT_SYSTEM in tok.chat_template
  system = [{"role": "system", "content": "Be brief."}] + messages
  assert tokenizer_lib.chatml(system, default_system="unused").startswith(
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
  )


def test_a_sources_own_new_tokens_become_the_projects(tmp_path):
  """IDEFICS's tokenizer.json holds `<fake_token_around_image>` (V) and `<image>` (V + 1): without
  them (`original_vocabulary`), `<image>` and `<EOC>` are appended at V and V + 1 as for any LM."""
  import json  # pylint: disable=g-import-not-at-top

  from tests.data import data_helpers  # pylint: disable=g-import-not-at-top

  path = data_helpers.byte_tokenizer_json(tmp_path / "src")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  for i, token in enumerate(("<fake_token_around_image>", "<image>")):
    data["added_tokens"].append(
      dict(
        id=257 + i,
        content=token,
        single_word=False,
        lstrip=False,
        rstrip=False,
        normalized=False,
        special=True,
      )
    )
  raw = json.dumps(data).encode()
  with pytest.raises(ValueError, match="already in the vocabulary"):
    (tmp_path / "src" / "tokenizer.json").write_bytes(raw)
    tokenizer_lib.Tokenizer.from_hf(path)
  (tmp_path / "src" / "tokenizer.json").write_bytes(tokenizer_lib.original_vocabulary(raw, 257))
  tok = tokenizer_lib.Tokenizer.from_hf(path)
  assert (tok.base_vocab_size, tok.image_id, tok.eoc_id) == (257, 257, 258)
  assert tok.encode("a<image>b") == [tok.encode("a")[0], 257, tok.encode("b")[0]]
