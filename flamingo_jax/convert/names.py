"""Explicit name tables: source checkpoint tensors -> project LM parameters.

Each `Entry` maps one source tensor name (`{i}` = decoder layer index) to a project parameter
`(module path, param name)` with a named transform. Per-layer tensors are stacked on a leading
`L` axis into `lm/layers` (see docs/ARCHITECTURE.md, "Parameter paths").

Shapes (project layout, `x @ w`, without the leading `L` of stacked layer params):
  V vocab, D width, Q = Hq*dh (query width), K = Hkv*dh (key/value width), F MLP hidden.

Source layouts. Both HF `nn.Linear` weights and GGUF tensors (as numpy arrays returned by
`gguf.quants.dequantize`; GGUF's `ne` order is reversed, `ne = [in, out]`) are `[out, in]`, so
every projection is transposed on import ('transpose'). Embeddings are `[V, D]` in all three
layouts and are copied as they are. Norm scales are `[D]`, copied: Llama's RMSNorm multiplies by
`weight` itself (no `1 + weight` offset).

RoPE layout. The project (like HF) rotates the pairs `(j, j + dh/2)` of each head ("rotate
half"). llama.cpp rotates adjacent pairs `(2j, 2j + 1)`, so its HF converter permutes the rows
of `q` and `k` within each head:

    gguf = hf.reshape(n_head, 2, dh // 2, *rest).swapaxes(1, 2).reshape(hf.shape)

i.e. HF row `h*dh + s*(dh/2) + j` (s in {0, 1}) goes to GGUF row `h*dh + 2*j + s`. The inverse
(`unpermute_rope`) reads the GGUF rows as `(n_head, dh/2, 2)` and swaps back to
`(n_head, 2, dh/2)`. `n_head` is Hq for `q` and Hkv for `k` (grouped-query attention).
"""

import dataclasses

import numpy as np

# The project modules and the names of their parameters.
EMBED = "lm/embed"
LAYERS = "lm/layers"
FINAL_NORM = "lm/final_norm"
UNEMBED = "lm/unembed"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source tensor -> one project parameter.

  Attributes:
    source: source tensor name; `{i}` is the layer index for per-layer tensors.
    module: project module path ('lm/embed', 'lm/layers', ...).
    name: parameter name inside `module`.
    transform: 'copy' | 'transpose' | 'unpermute_q' | 'unpermute_k' | 'conv' | 'scalar' |
      'vector_gate' | 'split_0' .. 'split_2' | 'half_0', 'half_1' (see `to_project`).
    shape: project shape as letters of `dims(config)` (no leading layer axis).
    untied_only: the tensor exists only when the output embedding is untied.
    source_shape: the source's shape as letters, where it is not the project's (transposed for
      projections) one: a fused tensor that several entries split.
  """

  source: str
  module: str
  name: str
  transform: str
  shape: tuple[str, ...]
  untied_only: bool = False
  source_shape: tuple[str, ...] | None = None

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.source


# GGUF (llama.cpp `llama` architecture) tensor names.
GGUF_TABLE = (
  Entry("token_embd.weight", EMBED, "embeddings", "copy", ("V", "D")),
  Entry("blk.{i}.attn_norm.weight", LAYERS, "attn_norm", "copy", ("D",)),
  # q/k: undo llama.cpp's interleaved-RoPE row permutation, then [out, in] -> [in, out].
  Entry("blk.{i}.attn_q.weight", LAYERS, "q", "unpermute_q", ("D", "Q")),
  Entry("blk.{i}.attn_k.weight", LAYERS, "k", "unpermute_k", ("D", "K")),
  # The remaining projections: [out, in] -> [in, out].
  Entry("blk.{i}.attn_v.weight", LAYERS, "v", "transpose", ("D", "K")),
  Entry("blk.{i}.attn_output.weight", LAYERS, "o", "transpose", ("Q", "D")),
  Entry("blk.{i}.ffn_norm.weight", LAYERS, "mlp_norm", "copy", ("D",)),
  Entry("blk.{i}.ffn_gate.weight", LAYERS, "gate", "transpose", ("D", "F")),
  Entry("blk.{i}.ffn_up.weight", LAYERS, "up", "transpose", ("D", "F")),
  Entry("blk.{i}.ffn_down.weight", LAYERS, "down", "transpose", ("F", "D")),
  Entry("output_norm.weight", FINAL_NORM, "scale", "copy", ("D",)),
  # [V, D] -> [D, V]: the project's unembedding is `h @ w`.
  Entry("output.weight", UNEMBED, "w", "transpose", ("D", "V"), untied_only=True),
)

# Hugging Face Llama-family (Llama, SmolLM, Mistral) state-dict names. HF q/k rows are already
# in the project's rotate-half order: no permutation, only the [out, in] -> [in, out] transpose.
HF_TABLE = (
  Entry("model.embed_tokens.weight", EMBED, "embeddings", "copy", ("V", "D")),
  Entry("model.layers.{i}.input_layernorm.weight", LAYERS, "attn_norm", "copy", ("D",)),
  Entry("model.layers.{i}.self_attn.q_proj.weight", LAYERS, "q", "transpose", ("D", "Q")),
  Entry("model.layers.{i}.self_attn.k_proj.weight", LAYERS, "k", "transpose", ("D", "K")),
  Entry("model.layers.{i}.self_attn.v_proj.weight", LAYERS, "v", "transpose", ("D", "K")),
  Entry("model.layers.{i}.self_attn.o_proj.weight", LAYERS, "o", "transpose", ("Q", "D")),
  Entry("model.layers.{i}.post_attention_layernorm.weight", LAYERS, "mlp_norm", "copy", ("D",)),
  Entry("model.layers.{i}.mlp.gate_proj.weight", LAYERS, "gate", "transpose", ("D", "F")),
  Entry("model.layers.{i}.mlp.up_proj.weight", LAYERS, "up", "transpose", ("D", "F")),
  Entry("model.layers.{i}.mlp.down_proj.weight", LAYERS, "down", "transpose", ("F", "D")),
  Entry("model.norm.weight", FINAL_NORM, "scale", "copy", ("D",)),
  Entry("lm_head.weight", UNEMBED, "w", "transpose", ("D", "V"), untied_only=True),
)


# Hugging Face MPT (`MptForCausalLM`). Wqkv fuses q, k and v along its output rows ([3D, D]); the
# LayerNorms have no bias; lm_head is tied to wte (absent from the files).
_MPT = "transformer.blocks.{i}."
MPT_TABLE = (
  Entry("transformer.wte.weight", EMBED, "embeddings", "copy", ("V", "D")),
  Entry(_MPT + "norm_1.weight", LAYERS, "attn_norm", "copy", ("D",)),
  *(
    Entry(_MPT + "attn.Wqkv.weight", LAYERS, n, f"split_{j}", ("D", "Q"), source_shape=("3Q", "D"))
    for j, n in enumerate("qkv")
  ),
  Entry(_MPT + "attn.out_proj.weight", LAYERS, "o", "transpose", ("Q", "D")),
  Entry(_MPT + "norm_2.weight", LAYERS, "mlp_norm", "copy", ("D",)),
  Entry(_MPT + "ffn.up_proj.weight", LAYERS, "up", "transpose", ("D", "F")),
  Entry(_MPT + "ffn.down_proj.weight", LAYERS, "down", "transpose", ("F", "D")),
  Entry("transformer.norm_f.weight", FINAL_NORM, "scale", "copy", ("D",)),
)


def dims(config: dict) -> dict[str, int]:
  """The letters of `Entry.shape` for an LM config dict."""
  return {
    "V": config["vocab_size"],
    "D": config["dim"],
    "Q": config["num_heads"] * config["head_dim"],
    "3Q": 3 * config["num_heads"] * config["head_dim"],
    "K": config["num_kv_heads"] * config["head_dim"],
    "F": config["ffw_hidden"],
  }


def entries(table, config: dict):
  """Yields `(source_name, entry, layer_index | None)` for every tensor `config` needs."""
  for entry in table:
    if entry.untied_only and config["tie_embeddings"]:
      continue
    if entry.per_layer:
      for i in range(config["num_layers"]):
        yield entry.source.format(i=i), entry, i
    else:
      yield entry.source, entry, None


def project_shape(entry: Entry, config: dict, letters: dict | None = None) -> tuple[int, ...]:
  d = letters or dims(config)
  return tuple(d[letter] for letter in entry.shape)


def source_shape(entry: Entry, config: dict, letters: dict | None = None) -> tuple[int, ...]:
  """The shape of the source tensor: projections are stored [out, in], convolutions [O, I, H, W]."""
  if entry.source_shape is not None:
    d = letters or dims(config)
    return tuple(d[letter] for letter in entry.source_shape)
  shape = project_shape(entry, config, letters)
  if entry.transform == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if entry.transform == "scalar":
    return (1,)
  if entry.transform == "vector_gate":
    return (1, 1, shape[0])
  return shape if entry.transform == "copy" else shape[::-1]


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter permutation, HF rotate-half rows -> interleaved rows.

  Args:
    w: [n_head*dh, ...] HF q or k weight ([out, in]).
    n_head: heads of this projection (Hq for q, Hkv for k).

  Returns:
    [n_head*dh, ...]: HF row `h*dh + s*dh/2 + j` moved to row `h*dh + 2*j + s`.
  """
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """Exact inverse of `permute_rope`: GGUF interleaved rows -> HF rotate-half rows.

  The GGUF row index is `h*dh + 2*j + s`, i.e. a `(n_head, dh/2, 2)` reshape of the row axis;
  swapping the last two gives `(n_head, 2, dh/2)`, the HF order `h*dh + s*dh/2 + j`.
  """
  if w.shape[0] % (2 * n_head):
    raise ValueError(f"rows {w.shape[0]} are not a multiple of 2 * n_head = {2 * n_head}")
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_project(entry: Entry, w: np.ndarray, config: dict) -> np.ndarray:
  """Applies `entry.transform` to a source array ([out, in] for projections)."""
  if entry.transform == "copy":
    return w
  if entry.transform == "transpose":
    return w.T
  if entry.transform == "unpermute_q":
    return unpermute_rope(w, config["num_heads"]).T
  if entry.transform == "unpermute_k":
    return unpermute_rope(w, config["num_kv_heads"]).T
  if entry.transform == "conv":  # torch's [O, I, H, W] -> lax's HWIO
    return w.transpose(2, 3, 1, 0)
  if entry.transform == "scalar":  # a torch Parameter of shape [1] -> a scalar
    return w.reshape(())
  if entry.transform == "vector_gate":  # IDEFICS's per-channel alpha [1, 1, D] -> [D]
    return w.reshape(-1)
  if entry.transform.startswith(("split_", "half_")):  # part j of 3 (2) fused along the output axis
    parts = 3 if entry.transform.startswith("split_") else 2
    part = np.split(w, parts, axis=0)[int(entry.transform[-1])]
    return part.T if part.ndim == 2 else part  # a weight is [out, in]; a bias is copied
  raise ValueError(f"unknown transform {entry.transform!r} for {entry.source}")


def to_source(entry: Entry, w: np.ndarray, config: dict) -> np.ndarray:
  """Inverse of `to_project` (project array -> source array)."""
  if entry.transform == "copy":
    return w
  if entry.transform == "transpose":
    return w.T
  if entry.transform == "unpermute_q":
    return permute_rope(w.T, config["num_heads"])
  if entry.transform == "unpermute_k":
    return permute_rope(w.T, config["num_kv_heads"])
  raise ValueError(f"unknown transform {entry.transform!r} for {entry.source}")


def convert(table, source_names, read, config: dict, dtype, source: str, letters: dict | None = None) -> dict:
  """Maps source tensors to the project's Haiku-style LM params.

  Args:
    table: GGUF_TABLE or HF_TABLE.
    source_names: all tensor names in the source.
    read: `read(name) -> np.ndarray`, the source array; called once per needed name, after the
      names were checked (so a large file is not read before a naming error).
    config: LM config dict (`vocab_size`, `dim`, ...); other towers give `num_layers` and
      `tie_embeddings` (False) and their shape letters in `letters`.
    dtype: numpy dtype of the returned arrays.
    source: file or directory name used in error messages.
    letters: the shape letters (default `dims(config)`, the LM's).

  Returns:
    `{'lm/embed': {'embeddings': [V,D]}, 'lm/layers': {name: [L,...]}, 'lm/final_norm':
    {'scale': [D]}}` (+ `'lm/unembed': {'w': [D,V]}` when untied), numpy arrays of `dtype`.

  Raises:
    KeyError: a needed tensor is missing, or a tensor is not in the table (both named).
    ValueError: a tensor has the wrong shape (named, with both shapes).
  """
  wanted = list(entries(table, config))
  needed = {name for name, _, _ in wanted}
  present = set(source_names)
  missing = [name for name, _, _ in wanted if name not in present]
  if missing:
    raise KeyError(
      f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)"
    )
  extra = sorted(present - needed)
  if extra:
    raise KeyError(
      f"{source}: unmapped tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} ({len(extra)} in all)"
    )
  params = {}
  last = (None, None)  # the entries splitting one fused tensor follow each other: read it once
  for name, entry, layer in wanted:
    if last[0] != name:
      last = (name, np.asarray(read(name)))
    w = last[1]
    expected = source_shape(entry, config, letters)
    if tuple(w.shape) != expected:
      raise ValueError(f"{source}: tensor {name} has shape {tuple(w.shape)}, expected {expected}")
    w = to_project(entry, w, config).astype(dtype)
    module = params.setdefault(entry.module, {})
    if layer is None:
      module[entry.name] = np.ascontiguousarray(w)
    else:
      if entry.name not in module:
        module[entry.name] = np.empty((config["num_layers"],) + w.shape, dtype)
      module[entry.name][layer] = w
  return params


def convert_tensors(table, tensors: dict, *, num_layers: int, letters: dict, dtype, source: str) -> dict:
  """`convert` for a tower other than the LM, from tensors in memory: `{i}` runs over `num_layers`
  (layers or blocks) and the shapes come from `letters`."""
  config = {"num_layers": num_layers, "tie_embeddings": False}
  return convert(table, tensors, tensors.__getitem__, config, dtype, source, letters=letters)


def to_source_tensors(table, params: dict, config: dict) -> dict[str, np.ndarray]:
  """Inverse of `convert`: project params -> `{source name: source array}`.

  Raises KeyError naming a missing or unexpected project parameter.
  """
  expected = {(e.module, e.name) for _, e, _ in entries(table, config)}
  present = {(m, n) for m, sub in params.items() for n in sub}
  for module, name in sorted(present - expected):
    raise KeyError(f"unexpected project parameter {module}/{name}")
  out = {}
  for source_name, entry, layer in entries(table, config):
    if entry.name not in params.get(entry.module, {}):
      raise KeyError(f"missing project parameter {entry.module}/{entry.name}")
    w = np.asarray(params[entry.module][entry.name])
    expected = project_shape(entry, config)
    if layer is not None:
      expected = (config["num_layers"],) + expected
    if tuple(w.shape) != expected:
      raise ValueError(
        f"project parameter {entry.module}/{entry.name} has shape {tuple(w.shape)}, expected {expected}"
      )
    w = w if layer is None else w[layer]
    out[source_name] = np.ascontiguousarray(to_source(entry, w, config))
  return out
