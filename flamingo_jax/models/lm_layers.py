"""The decoder LM's configuration and its per-layer pieces: one pre-norm decoder layer, the stacked layer
params, embeddings, output weights and final norm (`lm.py` runs them).

Shapes: B batch, T tokens, S key slots, L layers, D width, V vocabulary, E extra tokens, Hq/Hkv heads,
dh head dim, F MLP width.
"""

import dataclasses
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import layers

_MLP_ACTIVATIONS = {"gelu": "gelu_tanh", "gelu_exact": "gelu"}  # mlp kind -> layers.ACTIVATIONS
_MLP_KINDS = ("swiglu", *_MLP_ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = 49152  # V, the original vocabulary
  dim: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  ffw_hidden: int = 1536
  mlp: str = "swiglu"  # 'swiglu' | 'gelu' (tanh approximation: the paper's LM) | 'gelu_exact' (MPT)
  norm: str = "rms"  # 'rms' | 'layer' | 'layer_nobias' (MPT)
  norm_eps: float = 1e-5
  position: str = "rope"  # 'rope' | 'alibi' (MPT: no rotation, a per-head linear distance bias)
  alibi_bias_max: float = 8.0
  rope_theta: float = 100000.0
  tie_embeddings: bool = True
  max_seq_len: int = 8192
  num_extra_tokens: int = 2  # E: <image> = V, <EOC> = V+1
  attention: str = "einsum"  # how, not what: `layers.ATTENTION_IMPLEMENTATIONS` ('fused' on accelerators)

  def __post_init__(self):
    for key, allowed in (
      ("mlp", _MLP_KINDS),
      ("norm", ("rms", "layer", "layer_nobias")),
      ("position", ("rope", "alibi")),
      ("attention", layers.ATTENTION_IMPLEMENTATIONS),
    ):
      if getattr(self, key) not in allowed:
        raise ValueError(f"lm.{key} must be one of {allowed}, got {getattr(self, key)!r}")

  @classmethod
  def from_dict(cls, d) -> "LMConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise KeyError(f"Unknown LM config keys: {sorted(unknown)}")
    return cls(**d)


class Position(NamedTuple):
  """How the layers see token positions: RoPE angles (cos, sin [B, T, dh/2]) or an ALiBi bias
  [B, Hq, T, S] (`position='alibi'`: MPT); the other is None."""

  cos: jax.Array | None
  sin: jax.Array | None
  alibi: jax.Array | None


def _norm(x, p: dict, name: str, cfg: LMConfig):
  """The pre-norm `name` of a layer: RMSNorm, LayerNorm, or LayerNorm without a bias (MPT)."""
  if cfg.norm == "rms":
    return layers.rms_norm(x, p[name], cfg.norm_eps)
  bias = p[f"{name}_bias"] if cfg.norm == "layer" else jnp.zeros_like(p[name])
  return layers.layer_norm(x, p[name], bias, cfg.norm_eps)


def decoder_layer(p: dict, x, pos: Position, mask, cfg: LMConfig, dtype, cache_kv=None, index=None):
  """One pre-norm decoder layer. x: [B, T, D] fp32; mask: [B, T, S] where S = T, or the cache length.

  With `cache_kv = (k, v)` [B, S, Hkv, dh], this step's K/V are written at slot `index` and attention runs
  over the whole cache. Returns (x, (k, v) or None).
  """
  b, t, _ = x.shape
  h = _norm(x, p, "attn_norm", cfg)
  q = layers.matmul(h, p["q"], dtype).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = layers.matmul(h, p["k"], dtype).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = layers.matmul(h, p["v"], dtype).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if pos.cos is not None:
    q, k = layers.apply_rope(q, pos.cos, pos.sin), layers.apply_rope(k, pos.cos, pos.sin)
  new_kv = None
  if cache_kv is not None:
    ck, cv = cache_kv
    k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
    new_kv = (k, v)
  attn = layers.attention(q, k, v, mask, dtype, bias=pos.alibi, implementation=cfg.attention).reshape(
    b, t, -1
  )
  x = x + layers.matmul(attn, p["o"], dtype)
  h = _norm(x, p, "mlp_norm", cfg)
  if cfg.mlp == "swiglu":
    x = x + layers.swiglu_mlp(h, p["gate"], p["up"], p["down"], dtype)
  else:
    x = x + layers.mlp(h, p["up"], p["down"], _MLP_ACTIVATIONS[cfg.mlp], dtype)
  return x, new_kv


def layer_params(c: LMConfig) -> dict:
  """The stacked decoder-layer params (`lm/layers`), [L, ...] each."""
  n = c.num_layers
  init = layers.truncated_normal_init
  qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  with hk.experimental.name_scope("layers"):
    get = hk.get_parameter
    p = {
      "attn_norm": get("attn_norm", [n, c.dim], init=jnp.ones),
      "q": get("q", [n, c.dim, qd], init=init(c.dim)),
      "k": get("k", [n, c.dim, kvd], init=init(c.dim)),
      "v": get("v", [n, c.dim, kvd], init=init(c.dim)),
      "o": get("o", [n, qd, c.dim], init=init(qd)),
      "mlp_norm": get("mlp_norm", [n, c.dim], init=jnp.ones),
      "up": get("up", [n, c.dim, c.ffw_hidden], init=init(c.dim)),
      "down": get("down", [n, c.ffw_hidden, c.dim], init=init(c.ffw_hidden)),
    }
    if c.mlp == "swiglu":
      p["gate"] = get("gate", [n, c.dim, c.ffw_hidden], init=init(c.dim))
    if c.norm == "layer":
      p["attn_norm_bias"] = get("attn_norm_bias", [n, c.dim], init=jnp.zeros)
      p["mlp_norm_bias"] = get("mlp_norm_bias", [n, c.dim], init=jnp.zeros)
  return p


def embeddings(c: LMConfig):
  """Frozen table [V, D] and trainable extra rows [E, D]."""
  with hk.experimental.name_scope("embed"):
    table = hk.get_parameter("embeddings", [c.vocab_size, c.dim], init=hk.initializers.TruncatedNormal(1.0))
  with hk.experimental.name_scope("extra_embed"):
    extra = hk.get_parameter(
      "embeddings", [c.num_extra_tokens, c.dim], init=hk.initializers.TruncatedNormal(0.02)
    )
  return table, extra


def output_weights(c: LMConfig, table, extra):
  """[D, V] and [D, E] output projections (the embedding rows when tied)."""
  if c.tie_embeddings:
    return table.T, extra.T
  with hk.experimental.name_scope("unembed"):
    w = hk.get_parameter("w", [c.dim, c.vocab_size], init=layers.truncated_normal_init(c.dim))
  with hk.experimental.name_scope("extra_unembed"):
    w_extra = hk.get_parameter("w", [c.dim, c.num_extra_tokens], init=layers.truncated_normal_init(c.dim))
  return w, w_extra


def final_norm(c: LMConfig, x):
  with hk.experimental.name_scope("final_norm"):
    scale = hk.get_parameter("scale", [c.dim], init=jnp.ones)
    if c.norm == "rms":
      return layers.rms_norm(x, scale, c.norm_eps)
    bias = hk.get_parameter("bias", [c.dim], init=jnp.zeros) if c.norm == "layer" else jnp.zeros_like(scale)
    return layers.layer_norm(x, scale, bias, c.norm_eps)


class Head(NamedTuple):
  """What the output head reads: final hidden states h [B, T, D] and the weights [D, V], [D, E]."""

  hidden: jax.Array
  w_out: jax.Array
  w_extra: jax.Array


def head_logits(head: Head, dtype) -> jax.Array:
  """[..., V+E] fp32 logits of `head.hidden` [..., D] (the original vocabulary, then the extra rows)."""
  return jnp.concatenate(
    [layers.matmul(head.hidden, head.w_out, dtype), layers.matmul(head.hidden, head.w_extra, dtype)], axis=-1
  )
