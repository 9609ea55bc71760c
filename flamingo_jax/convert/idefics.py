"""IDEFICS (transformers' `IdeficsForVisionText2Text`) -> the project's GATED XATTN-DENSE params.

IDEFICS's blocks (`model.gated_cross_attn_layers.{i}`, one per `cross_layer_interval` LM layers) are
the project's block in its IDEFICS flavour (`gated_xattn.XAttnConfig`): `norm='rms'`, `ffw='swiglu'`
of the LM's intermediate width, `qk_norm` for `qk_layer_norms`, `gate_shape='vector'` for
`alpha_type='vector'` ([1, 1, D] alphas; 'float' alphas are [1]), q/k/v/o at the LM's width with
the LM's heads. `{i}` is the block's index among the blocks.

Shapes: D LM width, Dv vision width, I = heads * head dim (= D), dh head dim, F intermediate width.
nn.Linear weights are [out, in]; the project multiplies `x @ w`: transposed.
"""

import numpy as np

from flamingo_jax.convert import names

E = names.Entry
_X, _B = "lm/gated_xattn", "model.gated_cross_attn_layers.{i}."


def table(*, vector_gates: bool, qk_norm: bool) -> tuple:
  gate = ("vector_gate", ("D",)) if vector_gates else ("scalar", ())
  entries = [
    E(_B + "alpha_cross_attn", _X, "attn_gate", gate[0], gate[1]),
    E(_B + "alpha_dense", _X, "ffw_gate", gate[0], gate[1]),
    E(_B + "input_layernorm.weight", _X, "attn_norm_scale", "copy", ("D",)),
    E(_B + "cross_attn.q_proj.weight", _X, "q", "transpose", ("D", "I")),
    E(_B + "cross_attn.k_proj.weight", _X, "k", "transpose", ("Dv", "I")),
    E(_B + "cross_attn.v_proj.weight", _X, "v", "transpose", ("Dv", "I")),
    E(_B + "cross_attn.o_proj.weight", _X, "o", "transpose", ("I", "D")),
    E(_B + "post_attention_layernorm.weight", _X, "ffw_norm_scale", "copy", ("D",)),
    E(_B + "mlp.gate_proj.weight", _X, "ffw_gate_in", "transpose", ("D", "F")),
    E(_B + "mlp.up_proj.weight", _X, "ffw_in", "transpose", ("D", "F")),
    E(_B + "mlp.down_proj.weight", _X, "ffw_out", "transpose", ("F", "D")),
  ]
  if qk_norm:
    entries += [
      E(_B + "cross_attn.q_layer_norm.weight", _X, "q_norm", "copy", ("dh",)),
      E(_B + "cross_attn.k_layer_norm.weight", _X, "k_norm", "copy", ("dh",)),
    ]
  return tuple(entries)


def convert_xattn(
  tensors: dict,
  *,
  dim: int,
  media_dim: int,
  num_heads: int,
  ffw_hidden: int,
  num_blocks: int,
  vector_gates: bool,
  qk_norm: bool,
  dtype=np.float32,
  source: str = "",
) -> dict:
  """IDEFICS `model.gated_cross_attn_layers.{i}.*` (i = 0 .. num_blocks-1) -> `lm/gated_xattn`
  params stacked [X, ...]. Raises naming a missing, unmapped or mis-shaped tensor."""
  letters = {"D": dim, "Dv": media_dim, "I": dim, "F": ffw_hidden, "dh": dim // num_heads}
  config = {"num_layers": num_blocks, "tie_embeddings": False}
  entries = table(vector_gates=vector_gates, qk_norm=qk_norm)
  return names.convert(entries, tensors, tensors.__getitem__, config, dtype, source, letters=letters)
