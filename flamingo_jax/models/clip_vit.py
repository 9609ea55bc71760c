"""CLIP ViT vision encoder (OpenAI CLIP / OpenCLIP layout): the `vision_encoder` of the public
Flamingo-family checkpoints (OpenFlamingo: ViT-L/14; IDEFICS: ViT-H/14).

Shapes: B batch, S image side, p patch, g = S / p patches per side, P = g*g, D width, E output
(projection) width, L layers.

Images in [0, 1] are normalised with CLIP's mean and std inside the module, patchified by a
p x p stride-p convolution without bias, prefixed with the class token, given learned positions,
layer-normed (`ln_pre`), passed through L pre-LN blocks (`encoder.py`), and layer-normed again
(`ln_post`). Outputs: 'tokens' [B, Lv, D], what the source's resampler reads: the patch tokens
after `ln_post` (OpenFlamingo: open_clip's `output_tokens`; Lv = P), or every token, the class
token included, before `ln_post` (IDEFICS: the `last_hidden_state` of HF's CLIP vision model;
Lv = 1 + P); as the NFNet's, 'grid' [B, g, g, D] for the patch tokens; and 'pooled' [B, E], the
class token after `ln_post`, times `proj` where the source has one (CLIP's image embedding; HF's
vision model alone has none: E = D), for RICES.

Parameters (fp32) under `vision_encoder/`: patch_embed/w [p, p, 3, D], class_embedding [D],
positional_embedding [1 + P, D], ln_pre/{scale, bias} [D], layers/block/* (stacked, `encoder.py`),
ln_post/{scale, bias} [D], proj [D, E] (absent where `embed_dim` is 0).
"""

import dataclasses
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import encoder, layers

# OpenAI CLIP's pixel statistics (also used by OpenCLIP's LAION models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ViTVariant:
  image_size: int
  patch: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  embed_dim: int  # E of `proj`; 0: no projection (HF's CLIPVisionModel, as IDEFICS holds it)
  activation: str  # 'quick_gelu' (OpenAI weights) | 'gelu' (OpenCLIP LAION weights)
  tokens: str = "patches_post_ln"  # the resampler's input: 'patches_post_ln' | 'all_pre_ln' (IDEFICS)


VARIANTS = {
  "ViT-L/14": ViTVariant(224, 14, 1024, 24, 16, 4096, 768, "quick_gelu"),  # OpenAI CLIP (OpenFlamingo)
  "ViT-H/14": ViTVariant(224, 14, 1280, 32, 16, 5120, 1024, "gelu"),  # OpenCLIP LAION-2B
  # IDEFICS's ViT-H/14: HF layout without projection; its resampler reads every token before ln_post.
  "ViT-H/14-idefics": ViTVariant(224, 14, 1280, 32, 16, 5120, 0, "gelu", "all_pre_ln"),
  "ViT-test": ViTVariant(32, 8, 32, 2, 2, 128, 24, "quick_gelu"),  # unit tests
  "ViT-test-idefics": ViTVariant(32, 8, 32, 2, 2, 128, 0, "gelu", "all_pre_ln"),
}


def variant(name: str) -> ViTVariant:
  if name not in VARIANTS:
    raise ValueError(f"unknown CLIP ViT variant {name!r}; expected one of {sorted(VARIANTS)}")
  return VARIANTS[name]


def grid_size(variant_name: str, image_size: int) -> int:
  """Lv, the tokens per image the resampler reads: P patches, or 1 + P with the class token."""
  v = variant(variant_name)
  return (image_size // v.patch) ** 2 + (v.tokens == "all_pre_ln")


def output_dim(variant_name: str) -> int:
  """Dv, the width of the patch tokens."""
  return variant(variant_name).width


def largest_activation(variant_name: str, image_size: int) -> int:
  """Elements per image of the largest activation: the MLP's hidden or the attention logits."""
  v = variant(variant_name)
  tokens = 1 + grid_size(variant_name, image_size)
  return max(tokens * v.mlp_dim, v.heads * tokens * tokens)


class ClipViT(hk.Module):
  """CLIP's vision tower without its text side; images [B, S, S, 3] in [0, 1]."""

  def __init__(self, variant_name: str, name: str = "vision_encoder", *, dtype: Any = jnp.float32):
    super().__init__(name=name)
    self.v = variant(variant_name)
    self.dtype = dtype

  def __call__(self, images: jax.Array, is_training: bool = False) -> dict[str, jax.Array]:
    """images [B, S, S, 3] -> {'tokens': [B, Lv, D], 'grid': [B, g, g, D], 'pooled': [B, E]} (fp32)."""
    del is_training  # no dropout or stochastic depth in CLIP's towers
    v = self.v
    b, h, w, _ = images.shape
    if (h, w) != (v.image_size, v.image_size):
      raise ValueError(
        f"{self.module_name}: images of {h}x{w}; this variant takes {v.image_size}x{v.image_size}"
      )
    g, d = v.image_size // v.patch, v.width
    x = (images.astype(jnp.float32) - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    with hk.name_scope("patch_embed"):
      patch_w = hk.get_parameter(
        "w", (v.patch, v.patch, 3, d), jnp.float32, init=layers.truncated_normal_init(3 * v.patch**2)
      )  # HWIO
    x = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      patch_w.astype(self.dtype),
      window_strides=(v.patch, v.patch),
      padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32,
    ).reshape(b, g * g, d)  # row-major patches, as torch's flatten of [B, D, g, g]
    cls = hk.get_parameter("class_embedding", (d,), jnp.float32, init=hk.initializers.TruncatedNormal(0.02))
    pos = hk.get_parameter(
      "positional_embedding", (1 + g * g, d), jnp.float32, init=hk.initializers.TruncatedNormal(0.02)
    )
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos
    x = _norm("ln_pre", x, d)
    mask = jnp.ones((b, 1 + g * g, 1 + g * g), bool)
    x = encoder.encoder_layers(
      x,
      mask,
      num_layers=v.layers,
      num_heads=v.heads,
      mlp_dim=v.mlp_dim,
      eps=_LN_EPS,
      activation=v.activation,
      dtype=self.dtype,
    )
    pre_ln = x
    x = _norm("ln_post", x, d)
    pooled = x[:, 0]
    if v.embed_dim:
      proj = hk.get_parameter("proj", (d, v.embed_dim), jnp.float32, init=layers.truncated_normal_init(d))
      pooled = layers.matmul(pooled, proj, self.dtype)
    grid = x[:, 1:].reshape(b, g, g, d)
    tokens = pre_ln if v.tokens == "all_pre_ln" else x[:, 1:]
    return {"tokens": tokens, "grid": grid, "pooled": pooled}


def _norm(name: str, x: jax.Array, d: int) -> jax.Array:
  with hk.name_scope(name):
    scale = hk.get_parameter("scale", (d,), jnp.float32, init=jnp.ones)
    bias = hk.get_parameter("bias", (d,), jnp.float32, init=jnp.zeros)
  return layers.layer_norm(x, scale, bias, _LN_EPS)
