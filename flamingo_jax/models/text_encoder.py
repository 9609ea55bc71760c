"""BERT-style bidirectional Transformer text encoder, mean-pooled.

The text tower of the stage-1 contrastive model (Flamingo App. B.1.3).

Shapes: B batch, T tokens, D width, H heads, dh = D / H head dim,
F = mlp_mult * D MLP width, L layers.

Parameters (fp32), under `text_encoder/`:
  token_embed/embeddings [V, D], pos_embed/embeddings [max_len, D],
  layers/block/ (stacked on a leading L axis by hk.layer_stack):
    attn_norm_scale, attn_norm_bias [L, D], q, k, v [L, D, D], q_bias, k_bias,
    v_bias [L, D], o [L, D, D], o_bias [L, D], mlp_norm_scale, mlp_norm_bias
    [L, D], mlp_in [L, D, F], mlp_in_bias [L, F], mlp_out [L, F, D],
    mlp_out_bias [L, D],
  final_norm/{scale, bias} [D].
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import layers

_EMBED_INIT = hk.initializers.TruncatedNormal(stddev=0.02)
_LN_EPS = 1e-6


def _encoder_layer(x: jax.Array, mask: jax.Array, *, num_heads: int, mlp_mult: int, dtype: Any) -> jax.Array:
  """One pre-LN block on x [B, T, D] fp32 with attention mask [B, T, T].

  A plain function (not a module method), its parameters named in the scope
  `block`, so that hk.layer_stack stacks them under `<encoder>/layers/block`.
  """
  with hk.name_scope("block"):
    return _encoder_layer_body(x, mask, num_heads=num_heads, mlp_mult=mlp_mult, dtype=dtype)


def _encoder_layer_body(
  x: jax.Array, mask: jax.Array, *, num_heads: int, mlp_mult: int, dtype: Any
) -> jax.Array:
  b, t, d = x.shape
  h, f = num_heads, mlp_mult * d
  param = lambda n, shape, init: hk.get_parameter(n, shape, jnp.float32, init=init)
  zeros, ones = jnp.zeros, jnp.ones

  def dense(y, w_name, din, dout):
    w = param(w_name, (din, dout), layers.truncated_normal_init(din))
    return layers.matmul(y, w, dtype) + param(f"{w_name}_bias", (dout,), zeros)

  y = layers.layer_norm(
    x, param("attn_norm_scale", (d,), ones), param("attn_norm_bias", (d,), zeros), _LN_EPS
  )
  q, k, v = (dense(y, n, d, d).reshape(b, t, h, d // h) for n in "qkv")
  attn = layers.attention(q, k, v, mask, dtype).reshape(b, t, d)
  x = x + dense(attn, "o", d, d)

  y = layers.layer_norm(x, param("mlp_norm_scale", (d,), ones), param("mlp_norm_bias", (d,), zeros), _LN_EPS)
  y = jax.nn.gelu(dense(y, "mlp_in", d, f), approximate=False)
  return x + dense(y, "mlp_out", f, d)


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
    x = hk.layer_stack(self.num_layers, name="layers")(
      lambda y: _encoder_layer(y, mask, num_heads=self.num_heads, mlp_mult=self.mlp_mult, dtype=self.dtype)
    )(x)

    with hk.name_scope("final_norm"):
      scale = hk.get_parameter("scale", (self.dim,), jnp.float32, init=jnp.ones)
      bias = hk.get_parameter("bias", (self.dim,), jnp.float32, init=jnp.zeros)
    valid = token_mask[..., None].astype(jnp.float32)
    x = layers.layer_norm(x, scale, bias, _LN_EPS) * valid
    pooled = jnp.sum(x, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    return {"tokens": x, "pooled": pooled}
