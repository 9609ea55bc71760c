"""Stage-1 contrastive image-text model (Flamingo App. B.1.3).

An NFNet image tower and a BERT-style text tower, each mean-pooled, linearly
projected to a shared space of width E and L2-normalised, trained with a
two-way softmax contrastive loss (label smoothing 0.1) and a learnable inverse
temperature. The trained NFNet is then restored, frozen, into Flamingo by its
parameter path `vision_encoder/...`.

Shapes: B batch, H, W pixels, T text tokens, E embed_dim.

Parameters (top-level module paths):
  vision_encoder/...              the NFNet (flamingo_jax.models.nfnet)
  text_encoder/...                the TextEncoder
  contrastive/image_proj {w, b}   [Dv, E], [E]
  contrastive/text_proj {w, b}    [D, E], [E]
  contrastive {logit_scale}       [] log inverse temperature, init log(10)
"""

import math
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models.nfnet import NFNet
from flamingo_jax.models.text_encoder import TextEncoder

_NEG = -1e9  # Logit of excluded (padded) candidates; finite, so no NaNs.


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / max(||x||, eps) over the last axis, in fp32."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class ContrastiveModel(hk.Module):
  """Two towers, projections to a shared space and the inverse temperature.

  The towers are passed in already constructed: build them at the top level
  of the transformed function (as `make_contrastive_model` does), so that
  their parameters live at `vision_encoder/...` and `text_encoder/...`, not
  under `contrastive/`. A Haiku module cannot create top-level siblings.
  """

  def __init__(
    self, vision_encoder: NFNet, text_encoder: TextEncoder, embed_dim: int, name: str = "contrastive"
  ):
    super().__init__(name=name)
    self.vision_encoder = vision_encoder
    self.text_encoder = text_encoder
    self.embed_dim = embed_dim

  def __call__(
    self, images: jax.Array, tokens: jax.Array, token_mask: jax.Array, is_training: bool
  ) -> dict[str, jax.Array]:
    """Embeds paired images and texts.

    Args:
      images: float [B, H, W, 3] in [0, 1].
      tokens: int32 [B, T].
      token_mask: bool [B, T], True for real tokens.
      is_training: Python bool; enables NFNet stochastic depth (needs an rng).

    Returns:
      {'image_embed': fp32 [B, E] unit norm, 'text_embed': fp32 [B, E] unit
       norm, 'logit_scale': fp32 [] the log inverse temperature}.
    """
    vision = self.vision_encoder(images, is_training=is_training)["pooled"]
    text = self.text_encoder(tokens, token_mask, is_training=is_training)["pooled"]
    image_embed = hk.Linear(self.embed_dim, name="image_proj")(vision.astype(jnp.float32))
    text_embed = hk.Linear(self.embed_dim, name="text_proj")(text.astype(jnp.float32))
    logit_scale = hk.get_parameter(
      "logit_scale", (), jnp.float32, init=hk.initializers.Constant(math.log(10.0))
    )
    return {
      "image_embed": l2_normalize(image_embed),
      "text_embed": l2_normalize(text_embed),
      "logit_scale": logit_scale,
    }


def _one_way(
  logits: jax.Array, valid: jax.Array, num_valid: jax.Array, label_smoothing: float
) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy of each row (anchor) against all valid columns.

  Args:
    logits: fp32 [B, B], row i's positive is column i.
    valid: bool [B].
    num_valid: fp32 [] number of valid examples (>= 1).
    label_smoothing: mass spread uniformly over the valid columns.

  Returns:
    (mean loss over valid rows [], top-1 accuracy over valid rows []).
  """
  b = logits.shape[0]
  logits = jnp.where(valid[None, :], logits, _NEG)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  targets = (1.0 - label_smoothing) * jnp.eye(b, dtype=jnp.float32) + label_smoothing / num_valid
  targets = jnp.where(valid[None, :], targets, 0.0)
  ce = -jnp.sum(targets * log_probs, axis=-1)  # [B]
  loss = jnp.sum(jnp.where(valid, ce, 0.0)) / num_valid
  correct = jnp.argmax(logits, axis=-1) == jnp.arange(b)
  accuracy = jnp.sum(jnp.where(valid, correct, False)) / num_valid
  return loss, accuracy


def contrastive_loss(
  image_embed: jax.Array,
  text_embed: jax.Array,
  logit_scale: jax.Array,
  valid: jax.Array | None = None,
  label_smoothing: float = 0.1,
  terms: str = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Two-way softmax contrastive loss with label smoothing, in fp32.

  logits[i, j] = exp(logit_scale) * <image_i, text_j>. The loss is the sum (`terms='sum'`, the
  paper's Eq. 3) or the mean of the image->text (rows) and text->image (columns) cross-entropies,
  each averaged over valid anchors. Smoothed targets put 1 - eps + eps / n on the positive and
  eps / n on every other valid candidate (n = number of valid examples). Invalid examples are
  neither anchors nor candidates.

  Args:
    image_embed: [B, E], normally unit-norm.
    text_embed: [B, E], normally unit-norm; row i pairs with image i.
    logit_scale: [] log inverse temperature.
    valid: optional bool [B]; False marks padding examples.
    label_smoothing: eps in [0, 1).

  Returns:
    (loss [], metrics) with metrics 'loss', 'i2t_loss', 't2i_loss',
    'i2t_accuracy', 't2i_accuracy' (top-1 over valid anchors),
    'inverse_temperature' and 'num_valid', all fp32 scalars.

  Long: the argument checks, both directions and their metrics of one loss.
  """
  if image_embed.ndim != 2 or image_embed.shape != text_embed.shape:
    raise ValueError(
      f"contrastive_loss: embeddings {image_embed.shape}, {text_embed.shape}: not both [B, E]."
    )
  if terms not in ("sum", "mean"):
    raise ValueError(f"contrastive_loss: terms must be 'sum' or 'mean', got {terms!r}")
  b = image_embed.shape[0]
  if valid is None:
    valid = jnp.ones((b,), bool)
  elif valid.shape != (b,):
    raise ValueError(f"contrastive_loss: valid has shape {valid.shape}, expected ({b},).")
  valid = valid.astype(bool)
  num_valid = jnp.sum(valid).astype(jnp.float32)
  safe_n = jnp.maximum(num_valid, 1.0)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  logits = scale * jnp.einsum(
    "ie,je->ij",
    image_embed.astype(jnp.float32),
    text_embed.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  i2t_loss, i2t_acc = _one_way(logits, valid, safe_n, label_smoothing)
  t2i_loss, t2i_acc = _one_way(logits.T, valid, safe_n, label_smoothing)
  loss = (i2t_loss + t2i_loss) * (1.0 if terms == "sum" else 0.5)
  metrics = {
    "loss": loss,
    "i2t_loss": i2t_loss,
    "t2i_loss": t2i_loss,
    "i2t_accuracy": i2t_acc,
    "t2i_accuracy": t2i_acc,
    "inverse_temperature": scale,
    "num_valid": num_valid,
  }
  return loss, metrics


def make_contrastive_model(config: Any, dtype: Any = jnp.float32) -> hk.Transformed:
  """The stage-1 model as a pure pair of functions.

  Args:
    config: has `vision_variant`, `embed_dim` and `text.{vocab_size, dim,
      num_layers, num_heads, max_len}` (e.g. an ml_collections ConfigDict).
    dtype: NFNet compute dtype (fp32 or bf16); text tower matmul dtype.

  Returns:
    hk.Transformed with init(rng, images, tokens, token_mask, is_training) and
    apply(params, rng, images, tokens, token_mask, is_training) ->
    ContrastiveModel outputs. is_training must be a Python bool (static under
    jit); apply needs an rng only when is_training.
  """
  vision_variant = config.vision_variant
  embed_dim = config.embed_dim
  text = config.text
  text_args = dict(
    vocab_size=text.vocab_size,
    dim=text.dim,
    num_layers=text.num_layers,
    num_heads=text.num_heads,
    max_len=text.max_len,
  )

  def forward(images, tokens, token_mask, is_training):
    vision_encoder = NFNet(vision_variant, dtype=dtype, name="vision_encoder")
    text_encoder = TextEncoder(**text_args, dtype=dtype, name="text_encoder")
    model = ContrastiveModel(vision_encoder, text_encoder, embed_dim, name="contrastive")
    return model(images, tokens, token_mask, is_training)

  return hk.transform(forward)
