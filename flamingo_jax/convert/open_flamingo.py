"""OpenFlamingo's trained modules -> the project's resampler and GATED XATTN-DENSE params.

OpenFlamingo (open_flamingo 2.x, after lucidrains' flamingo-pytorch) names its Perceiver Resampler
`perceiver.*` and its cross-attention blocks `gated_cross_attn_layers.{i}.*` on the language model.
Its flavour, which `make_model` takes as config: GELU feed-forwards (`ffw_activation='gelu'` in
both), no temporal embeddings in the resampler (`max_num_frames=None`: the project's table is set to
zeros, which add nothing), LayerNorm on the text only, no biases in the projections: the same as the
paper's otherwise. `{i}` below is the block's index among the blocks (0, 1, ...).

Shapes: Dr resampler width (= the vision width), I = heads * head dim, F FFW width, D LM width.
Every nn.Linear weight is [out, in] and the project multiplies `x @ w`: transposed. `to_kv` fuses
keys and values along its output rows ([2I, in]): half_0 is k, half_1 is v.
"""

import numpy as np

from flamingo_jax.convert import names

E = names.Entry
_RS, _LAYER = "perceiver_resampler", "perceiver_resampler/layers/layer"
_ATTN, _FFW = "perceiver.layers.{i}.0.", "perceiver.layers.{i}.1."

RESAMPLER_TABLE = (
  E("perceiver.latents", _RS, "latents", "copy", ("R", "Dr")),
  E(_ATTN + "norm_media.weight", _LAYER + "/media_norm", "scale", "copy", ("Dr",)),
  E(_ATTN + "norm_media.bias", _LAYER + "/media_norm", "offset", "copy", ("Dr",)),
  E(_ATTN + "norm_latents.weight", _LAYER + "/latent_norm", "scale", "copy", ("Dr",)),
  E(_ATTN + "norm_latents.bias", _LAYER + "/latent_norm", "offset", "copy", ("Dr",)),
  E(_ATTN + "to_q.weight", _LAYER, "q", "transpose", ("Dr", "I")),
  E(_ATTN + "to_kv.weight", _LAYER, "k", "half_0", ("Dr", "I"), source_shape=("2I", "Dr")),
  E(_ATTN + "to_kv.weight", _LAYER, "v", "half_1", ("Dr", "I"), source_shape=("2I", "Dr")),
  E(_ATTN + "to_out.weight", _LAYER, "o", "transpose", ("I", "Dr")),
  # FeedForward is nn.Sequential(LayerNorm, Linear, GELU, Linear): entries 0, 1 and 3.
  E(_FFW + "0.weight", _LAYER + "/ffw_norm", "scale", "copy", ("Dr",)),
  E(_FFW + "0.bias", _LAYER + "/ffw_norm", "offset", "copy", ("Dr",)),
  E(_FFW + "1.weight", _LAYER, "ffw_in", "transpose", ("Dr", "F")),
  E(_FFW + "3.weight", _LAYER, "ffw_out", "transpose", ("F", "Dr")),
  E("perceiver.norm.weight", _RS + "/final_norm", "scale", "copy", ("Dr",)),
  E("perceiver.norm.bias", _RS + "/final_norm", "offset", "copy", ("Dr",)),
)

_X, _BLOCK = "lm/gated_xattn", "gated_cross_attn_layers.{i}."
XATTN_TABLE = (
  E(_BLOCK + "attn_gate", _X, "attn_gate", "scalar", ()),
  E(_BLOCK + "ff_gate", _X, "ffw_gate", "scalar", ()),
  E(_BLOCK + "attn.norm.weight", _X, "attn_norm_scale", "copy", ("D",)),
  E(_BLOCK + "attn.norm.bias", _X, "attn_norm_bias", "copy", ("D",)),
  E(_BLOCK + "attn.to_q.weight", _X, "q", "transpose", ("D", "I")),
  E(_BLOCK + "attn.to_kv.weight", _X, "k", "half_0", ("Dr", "I"), source_shape=("2I", "Dr")),
  E(_BLOCK + "attn.to_kv.weight", _X, "v", "half_1", ("Dr", "I"), source_shape=("2I", "Dr")),
  E(_BLOCK + "attn.to_out.weight", _X, "o", "transpose", ("I", "D")),
  E(_BLOCK + "ff.0.weight", _X, "ffw_norm_scale", "copy", ("D",)),
  E(_BLOCK + "ff.0.bias", _X, "ffw_norm_bias", "copy", ("D",)),
  E(_BLOCK + "ff.1.weight", _X, "ffw_in", "transpose", ("D", "F")),
  E(_BLOCK + "ff.3.weight", _X, "ffw_out", "transpose", ("F", "D")),
)


def convert_resampler(
  tensors: dict,
  *,
  dim: int,
  depth: int,
  num_latents: int,
  inner: int,
  ffw_mult: int,
  max_frames: int,
  dtype=np.float32,
  source: str = "",
) -> dict:
  """OpenFlamingo `perceiver.*` tensors -> the project's `perceiver_resampler` params."""
  letters = {"R": num_latents, "Dr": dim, "I": inner, "2I": 2 * inner, "F": ffw_mult * dim}
  params = names.convert_tensors(
    RESAMPLER_TABLE, tensors, num_layers=depth, letters=letters, dtype=dtype, source=source
  )
  params[_RS]["temporal_embed"] = np.zeros((max_frames, dim), dtype)  # OpenFlamingo has none
  return params


def convert_xattn(
  tensors: dict,
  *,
  dim: int,
  media_dim: int,
  num_blocks: int,
  inner: int,
  ffw_mult: int,
  dtype=np.float32,
  source: str = "",
) -> dict:
  """OpenFlamingo `gated_cross_attn_layers.{i}.*` tensors (i = 0 .. num_blocks-1) -> `lm/gated_xattn`
  params, stacked [X, ...]."""
  letters = {"D": dim, "Dr": media_dim, "I": inner, "2I": 2 * inner, "F": ffw_mult * dim}
  return names.convert_tensors(
    XATTN_TABLE, tensors, num_layers=num_blocks, letters=letters, dtype=dtype, source=source
  )
