"""IDEFICS (transformers' `IdeficsForVisionText2Text`) -> the project's GATED XATTN-DENSE and resampler
params.

IDEFICS's blocks (`model.gated_cross_attn_layers.{i}`, one per `cross_layer_interval` LM layers) are
the project's block in its IDEFICS flavour (`gated_xattn.XAttnConfig`): `norm='rms'`, `ffw='swiglu'`
of the LM's intermediate width, `qk_norm` for `qk_layer_norms`, `gate_shape='vector'` for
`alpha_type='vector'` ([1, 1, D] alphas; 'float' alphas are [1]), q/k/v/o at the LM's width with
the LM's heads. `{i}` is the block's index among the blocks.

Shapes: D LM width, Dv vision width, I = heads * head dim (= D), dh head dim, F intermediate width.
nn.Linear weights are [out, in]; the project multiplies `x @ w`: transposed.

The resampler (`model.perceiver_resampler.*`) is the project's with `ffw_activation='relu'` and, for
`qk_layer_norms_perceiver`, `qk_norm` (a LayerNorm over each head's q and k).
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
  entries = table(vector_gates=vector_gates, qk_norm=qk_norm)
  return names.convert_tensors(
    entries, tensors, num_layers=num_blocks, letters=letters, dtype=dtype, source=source
  )


_RS, _L = "perceiver_resampler", "perceiver_resampler/layers/layer"
_PA, _PF = "model.perceiver_resampler.blocks.{i}.0.", "model.perceiver_resampler.blocks.{i}.1."


def resampler_table(*, qk_norm: bool) -> tuple:
  """IDEFICS's `IdeficsPerceiverResampler` (LayerNorms with biases; a ReLU MLP, `ffw_activation='relu'`)."""
  entries = [
    E("model.perceiver_resampler.latents", _RS, "latents", "copy", ("R", "Dr")),
    E(_PA + "context_layer_norm.weight", _L + "/media_norm", "scale", "copy", ("Dr",)),
    E(_PA + "context_layer_norm.bias", _L + "/media_norm", "offset", "copy", ("Dr",)),
    E(_PA + "latents_layer_norm.weight", _L + "/latent_norm", "scale", "copy", ("Dr",)),
    E(_PA + "latents_layer_norm.bias", _L + "/latent_norm", "offset", "copy", ("Dr",)),
    E(_PA + "q_proj.weight", _L, "q", "transpose", ("Dr", "I")),
    E(_PA + "k_proj.weight", _L, "k", "transpose", ("Dr", "I")),
    E(_PA + "v_proj.weight", _L, "v", "transpose", ("Dr", "I")),
    E(_PA + "output_proj.weight", _L, "o", "transpose", ("I", "Dr")),
    E(_PF + "ln.weight", _L + "/ffw_norm", "scale", "copy", ("Dr",)),
    E(_PF + "ln.bias", _L + "/ffw_norm", "offset", "copy", ("Dr",)),
    E(_PF + "fc.weight", _L, "ffw_in", "transpose", ("Dr", "F")),
    E(_PF + "c_proj.weight", _L, "ffw_out", "transpose", ("F", "Dr")),
    E("model.perceiver_resampler.layer_norm.weight", _RS + "/final_norm", "scale", "copy", ("Dr",)),
    E("model.perceiver_resampler.layer_norm.bias", _RS + "/final_norm", "offset", "copy", ("Dr",)),
  ]
  if qk_norm:
    for name in ("q", "k"):
      entries += [
        E(_PA + f"{name}_layer_norm.weight", _L + f"/{name}_norm", "scale", "copy", ("dh",)),
        E(_PA + f"{name}_layer_norm.bias", _L + f"/{name}_norm", "offset", "copy", ("dh",)),
      ]
  return tuple(entries)


def convert_resampler(
  tensors: dict,
  *,
  dim: int,
  depth: int,
  num_latents: int,
  num_heads: int,
  head_dim: int,
  qk_norm: bool,
  max_frames: int,
  dtype=np.float32,
  source: str = "",
) -> dict:
  """IDEFICS `model.perceiver_resampler.*` -> the project's `perceiver_resampler` params (its MLP is 4x
  the vision width; no temporal embeddings: the project's table is zeros)."""
  inner = num_heads * head_dim
  letters = {"R": num_latents, "Dr": dim, "I": inner, "F": 4 * dim, "dh": head_dim}
  entries = resampler_table(qk_norm=qk_norm)
  params = names.convert_tensors(
    entries, tensors, num_layers=depth, letters=letters, dtype=dtype, source=source
  )
  params[_RS]["temporal_embed"] = np.zeros((max_frames, dim), dtype)
  return params
