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

import os
import re

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


# ---------------------------------------------------------------------------------- the whole model
# A block's tensors appear under the block list and, as the same module, under the decoder layer that
# FlamingoLMMixin wraps (`checkpoint.pt` as released keeps the latter only); {l} is the LM layer.
_BLOCK_KEY = re.compile(
  r"^lang_encoder\.(?:gated_cross_attn_layers\.(?P<list>\d+)"
  r"|(?:model\.layers|transformer\.blocks)\.(?P<layer>\d+)\.gated_cross_attn_layer)\.(?P<rest>.+)$"
)
INPUT_EMBED_KEYS = ("lang_encoder.transformer.wte.weight", "lang_encoder.model.embed_tokens.weight")
OUTPUT_EMBED_KEY = "lang_encoder.lm_head.weight"


def block_tensors(state: dict, every: int, num_layers: int, source: str) -> dict:
  """`gated_cross_attn_layers.{block}.*` from a state dict that names blocks by their LM layer l.

  OpenFlamingo puts block (l + 1) // every - 1 before layer l when (l + 1) % every == 0; the project
  puts block x before layer first + x * every with first = every - 1: the same layers.
  """
  out = {}
  for key, w in state.items():
    m = _BLOCK_KEY.match(key)
    if not m:
      continue
    layer = int(m["list"] or m["layer"])
    if (layer + 1) % every or layer >= num_layers:
      raise ValueError(
        f"{source}: {key} is a block before LM layer {layer}, but with cross_attn_every_n_layers="
        f"{every} and {num_layers} layers blocks sit only before layers l with (l + 1) % {every} == 0"
      )
    out[f"gated_cross_attn_layers.{(layer + 1) // every - 1}.{m['rest']}"] = w
  return out


def new_token_rows(state: dict, lm_config: dict, lm_params: dict, vocab: int, source: str) -> dict:
  """The LM modules with OpenFlamingo's token rows: the LM's first `vocab` rows, and its new rows
  as the project's extra rows.

  OpenFlamingo appends `<|endofchunk|>` (id V) and `<image>` (V + 1), then `<PAD>` where the
  tokenizer has no pad token; the project's extra rows are `<image>` (V) then `<EOC>` (V + 1), so
  the two rows are taken in swapped order. The input table comes from the checkpoint (OpenFlamingo
  trains its new rows; the gradients of the others are masked). An untied output table's new rows
  are not trained and not in a released checkpoint: without them the rows are the mean of the
  output table, as transformers' `resize_token_embeddings` initialises them.
  """
  found = [k for k in INPUT_EMBED_KEYS if k in state]
  if not found:
    raise KeyError(f"{source}: no input embedding (one of {INPUT_EMBED_KEYS}); the new token rows live there")
  table = np.asarray(state[found[0]], np.float32)
  if table.shape[0] not in (vocab + 2, vocab + 3) or table.shape[1] != lm_config["dim"]:
    raise ValueError(
      f"{source}: {found[0]} has shape {table.shape}; OpenFlamingo's LM of {vocab} tokens and width "
      f"{lm_config['dim']} has ({vocab} + 2 or 3, {lm_config['dim']})"
    )
  swap = [vocab + 1, vocab]  # [<image>, <|endofchunk|>]
  dtype = lm_params["lm/embed"]["embeddings"].dtype
  out = dict(lm_params)
  out["lm/embed"] = {"embeddings": table[:vocab].astype(dtype)}
  out["lm/extra_embed"] = {"embeddings": table[swap].astype(dtype)}
  if not lm_config["tie_embeddings"]:
    w = np.asarray(lm_params["lm/unembed"]["w"], np.float32)[:, :vocab]  # [D, V]
    if OUTPUT_EMBED_KEY in state:
      extra = np.asarray(state[OUTPUT_EMBED_KEY], np.float32)[swap].T  # [V', D] rows -> [D, 2]
    else:
      extra = np.repeat(w.mean(axis=1, keepdims=True), 2, axis=1)
    out["lm/unembed"] = {"w": w.astype(dtype)}
    out["lm/extra_unembed"] = {"w": extra.astype(dtype)}
  return out


def original_vocab(lm_dir: str, lm_config: dict) -> int:
  """V: the tokens of the LM's tokenizer (`tokenizer.json`, as OpenFlamingo counts them before its
  additions), else the LM config's vocabulary."""
  path = os.path.join(lm_dir, "tokenizer.json")
  if not os.path.exists(path):
    return int(lm_config["vocab_size"])
  import tokenizers  # pylint: disable=g-import-not-at-top

  return tokenizers.Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)


def convert_checkpoint(
  checkpoint: str, lm_dir: str, vision: str, *, vision_variant: str, every: int, dtype=np.float32
):
  """OpenFlamingo `checkpoint.pt` (or .safetensors) + the LM's HF directory + the open_clip vision
  weights -> (model ConfigDict, params {module: {name: array}}).

  Raises:
    KeyError / ValueError naming the tensor or file: a missing, extra or mis-shaped tensor, blocks
      that do not fit `every`, a wrong-family LM directory.
  """
  from flamingo_jax.convert import hf_lm, open_clip_vit, state_dict  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import clip_vit, flamingo, public  # pylint: disable=g-import-not-at-top

  state = state_dict.read_state_dict(checkpoint)
  lm_config, lm_params = hf_lm.load_hf_lm(lm_dir, dtype)
  vocab = original_vocab(lm_dir, lm_config)
  params = new_token_rows(state, lm_config, lm_params, vocab, checkpoint)
  lm_config = dict(lm_config, vocab_size=vocab)
  perceiver = {k: v for k, v in state.items() if k.startswith("perceiver.")}
  if "perceiver.latents" not in perceiver:
    raise KeyError(f"{checkpoint}: perceiver.latents is missing (not an OpenFlamingo checkpoint?)")
  depth = len({k.split(".")[2] for k in perceiver if k.startswith("perceiver.layers.")})
  width = clip_vit.variant(vision_variant).width
  spec = public.open_flamingo_spec(
    lm_config, vision_variant, width, every, depth=depth, num_latents=perceiver["perceiver.latents"].shape[0]
  )
  model_cfg = flamingo.build_model_config("open_flamingo", spec)
  r, x = model_cfg.resampler, model_cfg.xattn
  params.update(
    convert_resampler(
      perceiver,
      dim=r.dim,
      depth=r.depth,
      num_latents=r.num_latents,
      inner=r.num_heads * r.head_dim,
      ffw_mult=r.ffw_mult,
      max_frames=r.max_frames,
      dtype=dtype,
      source=checkpoint,
    )
  )
  blocks = block_tensors(state, every, lm_config["num_layers"], checkpoint)
  params.update(
    convert_xattn(
      blocks,
      dim=lm_config["dim"],
      media_dim=r.dim,
      num_blocks=lm_config["num_layers"] // every,
      inner=x.num_heads * x.head_dim,
      ffw_mult=x.ffw_mult,
      dtype=dtype,
      source=checkpoint,
    )
  )
  params.update(open_clip_vit.load_open_clip_vision(vision, vision_variant, dtype))
  return model_cfg, params
