"""BERT-style bidirectional Transformer text encoder, mean-pooled.

The text tower of the stage-1 contrastive model (Flamingo App. B.1.3).

Shapes: B batch, T tokens, D width, H heads, dh = D / H head dim,
F = mlp_mult * D MLP width, L layers.

Parameters (fp32), under `text_encoder/`:
  token_embed/embeddings [V, D], pos_embed/embeddings [max_len, D],
  layers/block/ (`encoder.py`, stacked on a leading L axis),
  final_norm/{scale, bias} [D].
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import encoder, layers

_EMBED_INIT = hk.initializers.TruncatedNormal(stddev=0.02)
_LN_EPS = 1e-6


class TextEncoder(hk.Module):
  """Pre-LN bidirectional encoder over padded token sequences."""

  def __init__(
    self,
    vocab_size: int,
    dim: int,
    num_layers: int,
    num_heads: int,
    max_len: int,
    mlp_mult: int = 4,
    name: str = "text_encoder",
    *,
    dtype: Any = jnp.float32,
  ):
    """Builds the encoder.

    Args:
      vocab_size: number of token ids V.
      dim: width D; must be divisible by num_heads.
      num_layers: L.
      num_heads: H.
      max_len: longest sequence T accepted (size of the position table).
      mlp_mult: MLP hidden width F = mlp_mult * D.
      name: module name.
      dtype: matmul input dtype (fp32 or bf16); norms, softmax and the
        residual stream stay fp32.
    """
    super().__init__(name=name)
    if dim % num_heads:
      raise ValueError(f"{name}: dim={dim} is not divisible by num_heads={num_heads}.")
    self.vocab_size = vocab_size
    self.dim = dim
    self.num_layers = num_layers
    self.num_heads = num_heads
    self.max_len = max_len
    self.mlp_mult = mlp_mult
    self.dtype = dtype

  def __call__(
    self, tokens: jax.Array, token_mask: jax.Array, is_training: bool = False
  ) -> dict[str, jax.Array]:
    """Encodes tokens.

    Args:
      tokens: int32 [B, T], T <= max_len.
      token_mask: bool [B, T], True for real tokens. Padding may sit on either
        side: positions count valid tokens only.
      is_training: unused (the encoder has no dropout); kept for a uniform
        interface.

    Returns:
      {'tokens': fp32 [B, T, D] final-LayerNorm outputs (0 at padding),
       'pooled': fp32 [B, D] mean over valid tokens (0 for empty rows)}.
    """
    del is_training
    if tokens.ndim != 2 or token_mask.shape != tokens.shape:
      raise ValueError(
        f"{self.module_name}: tokens {tokens.shape} and token_mask {token_mask.shape} must both be [B, T]."
      )
    if tokens.shape[1] > self.max_len:
      raise ValueError(
        f"{self.module_name}: sequence length {tokens.shape[1]} exceeds max_len={self.max_len}."
      )
    token_mask = token_mask.astype(bool)
    positions = layers.positions_from_mask(token_mask)
    x = hk.Embed(self.vocab_size, self.dim, w_init=_EMBED_INIT, name="token_embed")(tokens)
    x = x + hk.Embed(self.max_len, self.dim, w_init=_EMBED_INIT, name="pos_embed")(positions)
    x = x.astype(jnp.float32)

    # Bidirectional: every query sees every valid key.
    b, t = tokens.shape
    mask = jnp.broadcast_to(token_mask[:, None, :], (b, t, t))
    x = encoder.encoder_layers(
      x,
      mask,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_mult * self.dim,
      eps=_LN_EPS,
      activation="gelu",
      dtype=self.dtype,
    )

    with hk.name_scope("final_norm"):
      scale = hk.get_parameter("scale", (self.dim,), jnp.float32, init=jnp.ones)
      bias = hk.get_parameter("bias", (self.dim,), jnp.float32, init=jnp.zeros)
    valid = token_mask[..., None].astype(jnp.float32)
    x = layers.layer_norm(x, scale, bias, _LN_EPS) * valid
    pooled = jnp.sum(x, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    return {"tokens": x, "pooled": pooled}
