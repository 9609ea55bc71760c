"""Flamingo assembly: NFNet or CLIP ViT -> Perceiver Resampler -> decoder LM with gated cross-attention.

Shapes: B batch, N media items per sequence, F frames, H, W pixels, T tokens, R latents, Dr resampler width,
Dv vision width, V+E vocabulary (original + extra tokens).

`make_model(model_config)` returns pure functions over one params tree (top-level modules `vision_encoder`,
`perceiver_resampler`, `lm`):

    init(rng, images [B,N,F,H,W,3], tokens [B,T]) -> params
    forward(params, rng, images, tokens, media_index, token_mask, is_training) -> logits [B,T,V+E]
    encode_media(params, rng, images [B,N,F,H,W,3]) -> visual [B,N,R,Dr]
    lm_forward(params, rng, tokens, visual, media_index, token_mask, cache, lm_only) -> (logits, cache)
    prefill(params, tokens, cache, *, visual, media_index, token_mask, lm_only) -> (logits, cache)
    decode_step(params, tokens [B,1], cache, *, lm_only) -> (logits [B,1,V+E], cache)
        (the KV-cache calls of inference, `eval/engine.py`; the cache is `init_cache`'s)
    vision_features(params, rng, images [B,H,W,3]) -> pooled [B,Dv]   (RICES, contrastive checks)
    forward_features(params, rng, features [B,N,F,Lv,Dv], tokens, media_index, token_mask) -> logits
        (precomputed frozen-vision features: resampler + LM only)

The size table `SIZES` gives the paper's 3B/9B/80B (Table 4 / App. B.1.1), the real SmolLM2-135M LM shape
used on these machines, and a `tiny` size for tests.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from flamingo_jax.models import clip_vit, gated_xattn, kv_cache, layers, nfnet
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import perceiver_resampler as resampler_lib

# The one dtype table (model compute, frozen params, LM import, conversion); values work for jax and numpy.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _paper_lm(num_layers: int, dim: int, num_heads: int) -> dict:
  """The paper's frozen Chinchilla-family LM shape (GELU MLP, LayerNorm, 32k vocab, untied).

  Chinchilla spends 13*D^2 parameters per layer: 4*D^2 attention, 8*D^2 MLP and D^2 for the
  Transformer-XL relative-position projection. This implementation uses parameter-free RoPE instead, so
  the MLP is made 4.5*D wide to keep each layer at 13*D^2 and the LM at the paper's size.
  """
  return dict(
    vocab_size=32000,
    dim=dim,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=num_heads,
    head_dim=dim // num_heads,
    ffw_hidden=int(4.5 * dim),
    mlp="gelu",
    norm="layer",
    norm_eps=1e-5,
    rope_theta=10000.0,
    tie_embeddings=False,
    max_seq_len=2048,
  )


_PAPER_RESAMPLER = dict(
  dim=1536, depth=6, num_latents=64, num_heads=16, head_dim=128, ffw_mult=4, max_frames=8
)

SIZES = {
  # Unit tests: every shape small; 5 layers with xattn every 2 exercises the tail group.
  "tiny": dict(
    vision_variant="test",
    image_size=32,
    lm=dict(
      vocab_size=64,
      dim=32,
      num_layers=5,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      ffw_hidden=64,
      mlp="swiglu",
      norm="rms",
      norm_eps=1e-5,
      rope_theta=10000.0,
      tie_embeddings=True,
      max_seq_len=256,
    ),
    xattn=dict(every=2, num_heads=2, head_dim=16, ffw_mult=4),
    resampler=dict(dim=24, depth=2, num_latents=4, num_heads=2, head_dim=12, ffw_mult=4, max_frames=4),
  ),
  # SmolLM2-135M(-Instruct): the real frozen LM here. xattn before layers 0, 4, ..., 28 (8 blocks).
  "smollm2": dict(
    vision_variant="F0",
    image_size=64,
    lm=dict(
      vocab_size=49152,
      dim=576,
      num_layers=30,
      num_heads=9,
      num_kv_heads=3,
      head_dim=64,
      ffw_hidden=1536,
      mlp="swiglu",
      norm="rms",
      norm_eps=1e-5,
      rope_theta=100000.0,
      tie_embeddings=True,
      max_seq_len=8192,
    ),
    xattn=dict(every=4, num_heads=8, head_dim=64, ffw_mult=4),
    resampler=dict(dim=576, depth=6, num_latents=64, num_heads=8, head_dim=64, ffw_mult=4, max_frames=8),
  ),
  # Paper sizes: xattn every 1 / 4 / 7 layers; NFNet-F6 at 320 px; resampler 6 x 64 latents.
  "3b": dict(
    vision_variant="F6",
    image_size=320,
    lm=_paper_lm(24, 2048, 16),
    xattn=dict(every=1, num_heads=16, head_dim=128, ffw_mult=4),
    resampler=_PAPER_RESAMPLER,
  ),
  "9b": dict(
    vision_variant="F6",
    image_size=320,
    lm=_paper_lm(32, 4096, 32),
    xattn=dict(every=4, num_heads=32, head_dim=128, ffw_mult=4),
    resampler=_PAPER_RESAMPLER,
  ),
  "80b": dict(
    vision_variant="F6",
    image_size=320,
    lm=_paper_lm(80, 8192, 64),
    xattn=dict(every=7, num_heads=64, head_dim=128, ffw_mult=4),
    resampler=_PAPER_RESAMPLER,
  ),
}


def model_config(size: str) -> ml_collections.ConfigDict:
  """The model section of a config for one of `SIZES` (or of the public checkpoints' `public.SIZES`)."""
  from flamingo_jax.models import public  # pylint: disable=g-import-not-at-top  (it imports this module)

  sizes = {**SIZES, **public.SIZES}
  if size not in sizes:
    raise ValueError(f"Unknown model size {size!r}; expected one of {sorted(sizes)}.")
  return build_model_config(size, sizes[size])


def build_model_config(size: str, spec: dict) -> ml_collections.ConfigDict:
  """The model section for a size spec (a `SIZES` entry); the spec's `lm`, `xattn` and `resampler`
  keys override the defaults below (the paper's flavour), so the converters of the public
  checkpoints describe a model by the same dict."""
  lm_defaults = dict(position="rope", alibi_bias_max=8.0, num_extra_tokens=2, attention="einsum")
  lm = dict(lm_defaults, **spec["lm"])  # MPT: alibi
  # Ablation switches (gating, media_attention, kind) and the public checkpoints' flavours
  # (ffw_activation 'gelu': OpenFlamingo; norm 'rms', ffw 'swiglu', qk_norm, gate_shape: IDEFICS).
  xattn_defaults = dict(
    first=0,
    gating="tanh",
    media_attention="last",
    media_reset="none",
    ffw_activation="squared_relu",
    norm="layer",
    norm_eps=1e-5,
    ffw="mlp",
    ffw_hidden=0,
    qk_norm=False,
    gate_shape="scalar",
    attention="einsum",
  )
  resampler_defaults = dict(kind="perceiver", ffw_activation="squared_relu", qk_norm=False)
  return ml_collections.ConfigDict(
    dict(
      size=size,
      vision_variant=spec["vision_variant"],
      image_size=spec["image_size"],
      lm=lm,
      xattn=dict(xattn_defaults, **spec["xattn"]),
      resampler=dict(resampler_defaults, **spec["resampler"]),
      dtype="float32",  # compute dtype of matmuls ('bfloat16' on accelerators)
      remat="none",  # 'none' | 'full' | 'dots' | 'names' (layers.SAVED_ACTIVATIONS), per layer group
      scan_unroll=1,  # layer groups per scan iteration (>= number of groups: fully unrolled)
      freeze_vision=True,  # stop gradients at the vision encoder's output
    )
  )


@dataclasses.dataclass(frozen=True)
class Configs:
  lm: lm_lib.LMConfig
  xattn: gated_xattn.XAttnConfig
  resampler: resampler_lib.ResamplerConfig
  vision_variant: str
  dtype: Any
  remat: str
  freeze_vision: bool
  scan_unroll: int = 1


def parse_configs(cfg) -> Configs:
  """Typed, hashable configs from a model ConfigDict (unknown keys raise)."""
  res = resampler_lib.ResamplerConfig(**dict(cfg.resampler))
  xattn = gated_xattn.XAttnConfig(media_dim=res.dim, **dict(cfg.xattn))
  if cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
  return Configs(
    lm=lm_lib.LMConfig.from_dict(cfg.lm),
    xattn=xattn,
    resampler=res,
    vision_variant=cfg.vision_variant,
    dtype=DTYPES[cfg.dtype],
    remat=cfg.remat,
    freeze_vision=cfg.freeze_vision,
    scan_unroll=int(cfg.scan_unroll),
  )


def vision_encoder(variant: str, dtype) -> hk.Module:
  """The `vision_encoder` module of a variant: a CLIP ViT (`clip_vit.VARIANTS`, the public
  Flamingo-family checkpoints) or an NFNet (the paper's). Both map images [B, H, W, 3] in [0, 1] to
  {'grid': [B, h, w, Dv], 'pooled': [B, Dp]}, the ViT also {'tokens': [B, Lv, Dv]} (what its source's
  resampler reads)."""
  if variant in clip_vit.VARIANTS:
    return clip_vit.ClipViT(variant, dtype=dtype, name="vision_encoder")
  return nfnet.NFNet(variant, dtype=dtype, name="vision_encoder")


class _Flamingo:
  """Holds the three Haiku modules; only used inside a transform."""

  def __init__(self, c: Configs, constrain: layers.ActivationConstraint):
    self.c = c
    self.vision = vision_encoder(c.vision_variant, c.dtype)
    self.resampler = resampler_lib.PerceiverResampler(c.resampler, dtype=c.dtype, name="perceiver_resampler")
    self.lm = lm_lib.DecoderLM(
      c.lm,
      c.xattn,
      dtype=c.dtype,
      remat=c.remat,
      scan_unroll=c.scan_unroll,
      constrain=constrain,
      name="lm",
    )

  def vision_features(self, images):
    """images [B, H, W, 3] -> pooled [B, Dv] (frozen encoder, eval mode)."""
    return self.vision(images, is_training=False)["pooled"].astype(jnp.float32)

  def encode_media(self, images):
    """images [B, N, F, H, W, 3] in [0, 1] -> visual tokens [B, N, R, Dr]."""
    b, n, f, h, w, ch = images.shape
    out = self.vision(images.reshape(b * n * f, h, w, ch), is_training=False)
    # A CLIP ViT names the tokens its source's resampler reads; the NFNet's are its grid, flattened.
    tokens = out["tokens"] if "tokens" in out else out["grid"].reshape(b * n * f, -1, out["grid"].shape[-1])
    if self.c.freeze_vision:
      tokens = jax.lax.stop_gradient(tokens)
    return self.resampler(tokens.reshape(b, n, f, tokens.shape[1], tokens.shape[2]))

  def forward(self, images, tokens, media_index, token_mask=None, is_training=False, output="logits"):
    """-> logits [B, T, V+E], or with output='head_inputs' the LM's `Head` (`lm.DecoderLM`)."""
    del is_training  # no dropout in Flamingo's trained parts; kept for a uniform signature
    visual = self.encode_media(images)
    logits, _ = self.lm(tokens, visual=visual, media_index=media_index, token_mask=token_mask, output=output)
    return logits

  def forward_features(self, features, tokens, media_index, token_mask=None, output="logits"):
    """Precomputed frozen vision features [B, N, F, Lv, Dv] -> logits (resampler + LM only), or the
    LM's `Head` with output='head_inputs'."""
    visual = self.resampler(features)
    logits, _ = self.lm(tokens, visual=visual, media_index=media_index, token_mask=token_mask, output=output)
    return logits

  def lm_forward(self, tokens, visual=None, media_index=None, token_mask=None, cache=None, lm_only=False):
    return self.lm(
      tokens, visual=visual, media_index=media_index, token_mask=token_mask, cache=cache, lm_only=lm_only
    )


class FlamingoModel(NamedTuple):
  """Pure functions over one params tree (see the module docstring)."""

  configs: Configs
  init: Callable
  forward: Callable
  encode_media: Callable
  lm_forward: Callable
  vision_features: Callable
  forward_features: Callable

  def init_cache(
    self, batch: int, max_len: int, num_media: int, dtype=jnp.float32, tokens_per_media: int | None = None
  ) -> kv_cache.KVCache:
    """An empty cache; `tokens_per_media` = the visual tokens' axis 2 (default R: the Perceiver's)."""
    c = self.configs
    tokens = c.resampler.num_latents if tokens_per_media is None else tokens_per_media
    return kv_cache.init_cache(c.lm, c.xattn, batch, max_len, num_media, tokens, dtype)

  def prefill(self, params, tokens, cache, *, visual=None, media_index=None, token_mask=None, lm_only=False):
    """Appends tokens [B,T] (and their media K/V) to `cache` -> (logits [B,T,V+E], cache)."""
    return self.lm_forward(params, None, tokens, visual, media_index, token_mask, cache, lm_only)

  def decode_step(self, params, tokens, cache, *, lm_only=False):
    """One new token per row [B,1] -> (logits [B,1,V+E], cache); attends to the last image seen."""
    return self.lm_forward(params, None, tokens, None, None, None, cache, lm_only)


def make_model(model_cfg, constrain: layers.ActivationConstraint = layers.no_constraint) -> FlamingoModel:
  """Builds the transformed Flamingo functions from a model ConfigDict (see `model_config`).

  `constrain` places the LM's residual stream by logical axis names (`lm.RESIDUAL_AXES`); training on
  a mesh passes `parallel.logical.activation_constraint(mesh)`."""
  c = parse_configs(model_cfg)

  def template():
    model = _Flamingo(c, constrain)

    def init(images, tokens):
      media_index = jnp.zeros(tokens.shape, jnp.int32)
      return model.forward(images, tokens, media_index)

    return init, (
      model.forward,
      model.encode_media,
      model.lm_forward,
      model.vision_features,
      model.forward_features,
    )

  transformed = hk.multi_transform(template)
  forward, encode_media, lm_forward, vision_features, forward_features = transformed.apply
  return FlamingoModel(
    configs=c,
    init=transformed.init,
    forward=forward,
    encode_media=encode_media,
    lm_forward=lm_forward,
    vision_features=vision_features,
    forward_features=forward_features,
  )


def param_shapes(model_cfg) -> dict:
  """The params tree as `jax.ShapeDtypeStruct`s (`jax.eval_shape` of init: nothing materialised)."""
  size = model_cfg.image_size
  images = jax.ShapeDtypeStruct((1, 1, 1, size, size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(make_model(model_cfg).init, jax.random.PRNGKey(0), images, tokens)
