"""The pre-LN bidirectional Transformer layers shared by the text encoder and the CLIP ViT.

Shapes: B batch, T tokens, D width, H heads (dh = D / H), F MLP width, L layers.

Parameters of one block (fp32), stacked on a leading L axis by hk.layer_stack under
`<encoder>/layers/block/`:
  attn_norm_scale, attn_norm_bias [L, D], q, k, v [L, D, D], q_bias, k_bias, v_bias [L, D],
  o [L, D, D], o_bias [L, D], mlp_norm_scale, mlp_norm_bias [L, D], mlp_in [L, D, F],
  mlp_in_bias [L, F], mlp_out [L, F, D], mlp_out_bias [L, D].
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import layers


def _block(
  x: jax.Array, mask: jax.Array, *, num_heads: int, mlp_dim: int, eps: float, activation: str, dtype: Any
):
  """One pre-LN block on x [B, T, D] fp32 with attention mask [B, T, T]; parameters in scope `block`."""
  b, t, d = x.shape
  h = num_heads
  param = lambda n, shape, init: hk.get_parameter(n, shape, jnp.float32, init=init)  # noqa: E731
  zeros, ones = jnp.zeros, jnp.ones

  def dense(y, w_name, din, dout):
    w = param(w_name, (din, dout), layers.truncated_normal_init(din))
    return layers.matmul(y, w, dtype) + param(f"{w_name}_bias", (dout,), zeros)

  with hk.name_scope("block"):
    y = layers.layer_norm(x, param("attn_norm_scale", (d,), ones), param("attn_norm_bias", (d,), zeros), eps)
    q, k, v = (dense(y, n, d, d).reshape(b, t, h, d // h) for n in "qkv")
    attn = layers.attention(q, k, v, mask, dtype).reshape(b, t, d)
    x = x + dense(attn, "o", d, d)
    y = layers.layer_norm(x, param("mlp_norm_scale", (d,), ones), param("mlp_norm_bias", (d,), zeros), eps)
    y = layers.ACTIVATIONS[activation](dense(y, "mlp_in", d, mlp_dim))
    return x + dense(y, "mlp_out", mlp_dim, d)


def encoder_layers(
  x: jax.Array,
  mask: jax.Array,
  *,
  num_layers: int,
  num_heads: int,
  mlp_dim: int,
  eps: float,
  activation: str,
  dtype: Any,
) -> jax.Array:
  """L pre-LN blocks over x [B, T, D] fp32, mask bool [B, T, T] (True = may attend) -> [B, T, D]."""
  if activation not in layers.ACTIVATIONS:
    raise ValueError(f"activation {activation!r} not in {sorted(layers.ACTIVATIONS)}")
  if x.shape[-1] % num_heads:
    raise ValueError(f"width {x.shape[-1]} is not divisible by num_heads={num_heads}")
  return hk.layer_stack(num_layers, name="layers")(
    lambda y: _block(
      y, mask, num_heads=num_heads, mlp_dim=mlp_dim, eps=eps, activation=activation, dtype=dtype
    )
  )(x)
