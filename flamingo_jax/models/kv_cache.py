"""The LM's KV cache: one NamedTuple, its empty form, and the batch axis of each field.

Shapes: L layers, B batch, S cache slots, Hkv/dh key-value heads and head dim, X gated xattn blocks,
N media, R visual tokens per medium, H xattn heads.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flamingo_jax.models import gated_xattn


class KVCache(NamedTuple):
  """The KV cache every prefill and decode step threads (a pytree; `init_cache` makes it empty).

  k, v [L,B,S,Hkv,dh]; valid bool [B,S]; index int32 [] (next free slot, shared by the batch);
  positions int32 [B] (valid tokens seen: the RoPE offset); last_media int32 [B] (the medium the last
  token attends to); with xattn blocks xattn_k, xattn_v [X,B,N*R,H,dh] and xattn_owner int32 [N*R]."""

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array
  positions: jax.Array
  last_media: jax.Array
  xattn_k: jax.Array | None = None
  xattn_v: jax.Array | None = None
  xattn_owner: jax.Array | None = None


# Batch axis of each KV-cache leaf (None: shared by the batch, or absent), for beam reordering.
CACHE_BATCH_AXES = KVCache(1, 1, 0, None, 0, 0, xattn_k=1, xattn_v=1, xattn_owner=None)


def init_cache(
  lm,
  xattn: gated_xattn.XAttnConfig | None,
  batch: int,
  max_len: int,
  num_media: int = 0,
  tokens_per_media: int = 0,
  dtype=jnp.float32,
) -> KVCache:
  """An empty KV cache with room for `max_len` tokens and `num_media` media of `tokens_per_media`."""
  kv_shape = (lm.num_layers, batch, max_len, lm.num_kv_heads, lm.head_dim)
  cache = KVCache(
    k=jnp.zeros(kv_shape, dtype),
    v=jnp.zeros(kv_shape, dtype),
    valid=jnp.zeros((batch, max_len), bool),
    index=jnp.zeros((), jnp.int32),
    positions=jnp.zeros((batch,), jnp.int32),
    last_media=jnp.full((batch,), -1, jnp.int32),
  )
  if xattn is not None and xattn.every > 0:
    x = gated_xattn.num_xattn_blocks(lm.num_layers, xattn.every, xattn.first)
    m_shape = (x, batch, num_media * tokens_per_media, xattn.num_heads, xattn.head_dim)
    cache = cache._replace(
      xattn_k=jnp.zeros(m_shape, dtype),
      xattn_v=jnp.zeros(m_shape, dtype),
      xattn_owner=gated_xattn.media_owner(num_media, tokens_per_media),
    )
  return cache
