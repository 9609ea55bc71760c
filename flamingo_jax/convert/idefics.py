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


# ------------------------------------------------------------------------- the vision tower (HF CLIP)
# IDEFICS holds its ViT-H/14 as transformers' CLIP vision model (q/k/v apart, with biases; no
# projection). Letters as `open_clip_vit.letters`; {i} runs over the vision layers.
_V, _VL, _VB = "model.vision_model.", "model.vision_model.encoder.layers.{i}.", "vision_encoder/layers/block"


def _vision_pair(src: str, name: str, shape: tuple, kind: str = "transpose") -> tuple:
  """A linear layer's weight ([out, in] -> [in, out], as every nn.Linear) and bias."""
  return (
    E(_VL + src + ".weight", _VB, name, kind, shape),
    E(_VL + src + ".bias", _VB, f"{name}_bias", "copy", shape[-1:]),
  )


VISION_TABLE = (
  # Conv2d [D, 3, p, p] (OIHW) -> HWIO [p, p, 3, D], lax's layout for NHWC images.
  E(
    _V + "embeddings.patch_embedding.weight", "vision_encoder/patch_embed", "w", "conv", ("p", "p", "C", "D")
  ),
  E(_V + "embeddings.class_embedding", "vision_encoder", "class_embedding", "copy", ("D",)),
  E(
    _V + "embeddings.position_embedding.weight", "vision_encoder", "positional_embedding", "copy", ("T", "D")
  ),
  E(_V + "pre_layrnorm.weight", "vision_encoder/ln_pre", "scale", "copy", ("D",)),
  E(_V + "pre_layrnorm.bias", "vision_encoder/ln_pre", "bias", "copy", ("D",)),
  E(_VL + "layer_norm1.weight", _VB, "attn_norm_scale", "copy", ("D",)),
  E(_VL + "layer_norm1.bias", _VB, "attn_norm_bias", "copy", ("D",)),
  *_vision_pair("self_attn.q_proj", "q", ("D", "D")),
  *_vision_pair("self_attn.k_proj", "k", ("D", "D")),
  *_vision_pair("self_attn.v_proj", "v", ("D", "D")),
  *_vision_pair("self_attn.out_proj", "o", ("D", "D")),
  E(_VL + "layer_norm2.weight", _VB, "mlp_norm_scale", "copy", ("D",)),
  E(_VL + "layer_norm2.bias", _VB, "mlp_norm_bias", "copy", ("D",)),
  *_vision_pair("mlp.fc1", "mlp_in", ("D", "F")),
  *_vision_pair("mlp.fc2", "mlp_out", ("F", "D")),
  E(_V + "post_layernorm.weight", "vision_encoder/ln_post", "scale", "copy", ("D",)),
  E(_V + "post_layernorm.bias", "vision_encoder/ln_post", "bias", "copy", ("D",)),
)


# --------------------------------------------------------------------------------- the whole model
ADDITIONAL_EMBED = "model.embed_tokens.additional_embedding.weight"  # [2, D]: ids V, V + 1
ADDITIONAL_FC = "lm_head.additional_fc.weight"  # [2, D]: their logits
_TOWERS = ("model.vision_model.", "model.perceiver_resampler.", "model.gated_cross_attn_layers.")


def _field(hf: dict, path: str, key: str, section: str = ""):
  """hf[section][key], or the flat `hf[key]` older IDEFICS config.json files use; KeyError names it."""
  for where in ((hf.get(section) or {}) if section else {}, hf):
    if where.get(key) is not None:
      return where[key]
  raise KeyError(f"{path}: field {f'{section}.' if section else ''}{key} is missing")


def model_spec(hf: dict, path: str) -> dict:
  """A `public.idefics_spec` size spec from an IDEFICS `config.json` dict.

  Raises:
    ValueError: another model family (`model_type`), or a setting the project does not implement,
      named with the file.
  """
  from flamingo_jax.convert import hf_lm  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import clip_vit, public  # pylint: disable=g-import-not-at-top

  if hf.get("model_type") != "idefics":
    raise ValueError(
      f"{path}: model_type {hf.get('model_type')!r} is not 'idefics' (not an IDEFICS checkpoint)"
    )
  for key, want in (("use_resampler", True), ("additional_vocab_size", 2), ("tie_word_embeddings", False)):
    if hf.get(key, want) != want:
      raise ValueError(f"{path}: {key}={hf.get(key)!r} is not supported (only {want!r})")
  # Older files name the context `max_sequence_length`, newer ones `max_position_embeddings`.
  max_len = hf.get("max_position_embeddings") or _field(hf, path, "max_sequence_length")
  lm = hf_lm.config_from_hf(dict(hf, model_type="llama", max_position_embeddings=max_len), path)
  alpha = hf.get("alpha_type", "float")
  if alpha not in ("float", "vector"):
    raise ValueError(f"{path}: alpha_type {alpha!r} is not supported ('float' or 'vector')")
  vision = dict(
    image_size=int(_field(hf, path, "image_size", "vision_config")),
    patch=int(_field(hf, path, "patch_size", "vision_config")),
    width=int(_field(hf, path, "embed_dim", "vision_config")),
    layers=int(_field(hf, path, "num_hidden_layers", "vision_config")),
    heads=int(_field(hf, path, "num_attention_heads", "vision_config")),
    mlp_dim=int(_field(hf, path, "intermediate_size", "vision_config")),
    embed_dim=0,
    activation=str(_field(hf, path, "hidden_act", "vision_config")),
    tokens="all_pre_ln",
  )
  variants = [name for name, v in clip_vit.VARIANTS.items() if v == clip_vit.ViTVariant(**vision)]
  if not variants:
    raise ValueError(f"{path}: no CLIP ViT variant of shape {vision} in clip_vit.VARIANTS")
  return public.idefics_spec(
    dict(lm, rope_theta=10000.0),  # IdeficsEmbedding's fixed base
    every=int(_field(hf, path, "cross_layer_interval")),
    qk_norm=bool(hf.get("qk_layer_norms", False)),
    vector_gates=alpha == "vector",
    resampler_heads=int(_field(hf, path, "resampler_n_heads", "perceiver_config")),
    resampler_head_dim=int(_field(hf, path, "resampler_head_dim", "perceiver_config")),
    resampler_qk_norm=bool(_field(hf, path, "qk_layer_norms_perceiver", "perceiver_config")),
    vision_variant=variants[0],
    vision_width=vision["width"],
    depth=int(_field(hf, path, "resampler_depth", "perceiver_config")),
    num_latents=int(_field(hf, path, "resampler_n_latents", "perceiver_config")),
  )


class _LazyTensors(dict):
  """{name: file} that reads a tensor when it is looked up (an IDEFICS-80B does not fit in memory twice)."""

  def __init__(self, files: dict, stack):
    super().__init__(files)
    self._handles, self._stack = {}, stack

  def __getitem__(self, name):
    from flamingo_jax.convert import hf_lm  # pylint: disable=g-import-not-at-top

    path = super().__getitem__(name)
    if path not in self._handles:
      self._handles[path] = self._stack.enter_context(hf_lm.open_safetensors(path))
    return self._handles[path].get_tensor(name)


def convert_directory(directory: str, dtype=np.float32):
  """An IDEFICS HF directory (config.json + safetensors, one file or shards with an index) ->
  (model ConfigDict, params {module: {name: array}}).

  The additional rows: IDEFICS's ids V (`<fake_token_around_image>`) and V + 1 (`<image>`) are the
  project's `<EOC>` (V + 1) and `<image>` (V) rows: taken in swapped order.

  Raises:
    KeyError / ValueError naming the file or tensor: a missing, unmapped or mis-shaped tensor, a
      config of another family.

  Long: the five parts (LM, new rows, vision, resampler, blocks) read from one set of files in turn.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  from flamingo_jax.convert import hf_lm, open_clip_vit  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import clip_vit, flamingo, gated_xattn  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(directory, hf_lm.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} is missing: not a Hugging Face IDEFICS directory")
  with open(config_path) as f:
    hf = json.load(f)
  spec = model_spec(hf, config_path)
  cfg = flamingo.build_model_config("idefics", spec)
  lm, r, x, v = cfg.lm, cfg.resampler, cfg.xattn, clip_vit.variant(cfg.vision_variant)
  lm_config = {k: val for k, val in lm.to_dict().items() if k != "num_extra_tokens"}
  with contextlib.ExitStack() as stack:
    tensors = _LazyTensors(hf_lm.weight_files(directory), stack)
    part = lambda prefix: {k: tensors[k] for k in tensors if k.startswith(prefix)}  # noqa: E731  (read)
    lm_names = [
      k for k in tensors if not k.startswith(_TOWERS) and k not in (ADDITIONAL_EMBED, ADDITIONAL_FC)
    ]
    params = names.convert(names.HF_TABLE, lm_names, tensors.__getitem__, lm_config, dtype, directory)
    for key in (ADDITIONAL_EMBED, ADDITIONAL_FC):
      if key not in tensors:
        raise KeyError(f"{directory}: missing tensor {key} (the rows of IDEFICS's two new tokens)")
      rows = np.asarray(tensors[key], np.float32)
      if rows.shape != (2, lm.dim):
        raise ValueError(f"{directory}: tensor {key} has shape {rows.shape}, expected (2, {lm.dim})")
      rows = rows[[1, 0]]  # [<image>, <fake_token_around_image>]
      if key == ADDITIONAL_EMBED:
        params["lm/extra_embed"] = {"embeddings": rows.astype(dtype)}
      else:  # nn.Linear [out, in] -> [D, E] for `h @ w`
        params["lm/extra_unembed"] = {"w": rows.T.astype(dtype)}
    vision = part(_TOWERS[0])
    params.update(
      names.convert_tensors(
        VISION_TABLE,
        vision,
        num_layers=v.layers,
        letters=open_clip_vit.letters(v),
        dtype=dtype,
        source=directory,
      )
    )
    params.update(
      convert_resampler(
        part(_TOWERS[1]),
        dim=r.dim,
        depth=r.depth,
        num_latents=r.num_latents,
        num_heads=r.num_heads,
        head_dim=r.head_dim,
        qk_norm=r.qk_norm,
        max_frames=r.max_frames,
        dtype=dtype,
        source=directory,
      )
    )
    params.update(
      convert_xattn(
        part(_TOWERS[2]),
        dim=lm.dim,
        media_dim=r.dim,
        num_heads=x.num_heads,
        ffw_hidden=x.ffw_hidden,
        num_blocks=gated_xattn.num_xattn_blocks(lm.num_layers, x.every, x.first),
        vector_gates=x.gate_shape == "vector",
        qk_norm=x.qk_norm,
        dtype=dtype,
        source=directory,
      )
    )
  return cfg, params
