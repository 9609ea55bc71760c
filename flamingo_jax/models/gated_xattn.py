"""GATED XATTN-DENSE blocks (paper §2.2, Fig. 4), stacked on a leading block axis.

    y = y + tanh(attn_gate) * XAttn(LN(y), media)     # a token sees only its phi media item
    y = y + tanh(ffw_gate)  * FFW(LN(y))              # squared-ReLU MLP, 4x wide (`ffw_activation`)

Both gates start at 0, so at initialisation the block is the identity and Flamingo is exactly its LM.
The public checkpoints' flavours are config: OpenFlamingo's GELU FFW (`ffw_activation`), IDEFICS's
RMSNorm, SwiGLU FFW, q/k RMSNorm and per-channel gates (`norm`, `ffw`, `qk_norm`, `gate_shape`).
Two switches exist for the paper's ablations (Table 3), never as defaults: `gating='none'` adds both
terms ungated, and `media_attention='all_previous'` lets a token see every media item up to phi.

Shapes: X blocks, B batch, T tokens, N media per sequence, R visual tokens per media item, M = N*R,
D LM width, Dr media width, H heads, dh head dim.
"""

import dataclasses
import math

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import layers


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
  every: int = 4  # one block before every `every`-th LM layer, starting at layer `first`
  first: int = 0  # the paper's; OpenFlamingo's blocks sit before layer i when (i + 1) % every == 0
  num_heads: int = 8
  head_dim: int = 64
  ffw_mult: int = 4
  media_dim: int = 576  # Dr, the resampler's output width
  gating: str = "tanh"  # 'tanh' (the paper) | 'none' (ablation: ungated)
  media_attention: str = "last"  # 'last': the phi media item (the paper) | 'all_previous' (ablation)
  media_reset: str = "none"  # 'eos': after an end of sequence no image until the next (IDEFICS's phi)
  ffw_activation: str = "squared_relu"  # the paper's; 'gelu' in OpenFlamingo's blocks
  # IDEFICS's flavour: RMSNorm, a SwiGLU FFW of the LM's width, RMSNorm on each head's q and k,
  # one gate per channel (alpha_type='vector').
  norm: str = "layer"  # 'layer' (the paper, OpenFlamingo) | 'rms' (IDEFICS)
  norm_eps: float = 1e-5
  ffw: str = "mlp"  # 'mlp' (in, `ffw_activation`, out) | 'swiglu' (gate, up, down; SiLU)
  ffw_hidden: int = 0  # F; 0 = ffw_mult * D
  qk_norm: bool = False
  gate_shape: str = "scalar"  # 'scalar' | 'vector' ([D])
  attention: str = "einsum"  # `layers.ATTENTION_IMPLEMENTATIONS` ('fused': jax.nn.dot_product_attention)

  def __post_init__(self):
    if self.gating not in ("tanh", "none"):
      raise ValueError(f"xattn.gating must be 'tanh' or 'none', got {self.gating!r}")
    if self.media_attention not in ("last", "all_previous"):
      raise ValueError(
        f"xattn.media_attention must be 'last' or 'all_previous', got {self.media_attention!r}"
      )
    if self.attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
        f"xattn.attention must be one of {layers.ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}"
      )
    if self.media_reset not in ("none", "eos"):
      raise ValueError(f"xattn.media_reset must be 'none' or 'eos', got {self.media_reset!r}")
    if not 0 <= self.first < max(self.every, 1):
      raise ValueError(f"xattn.first must be in [0, every={self.every}), got {self.first}")
    if self.ffw_activation not in layers.ACTIVATIONS:
      raise ValueError(f"xattn.ffw_activation {self.ffw_activation!r} not in {sorted(layers.ACTIVATIONS)}")
    for key, allowed in (
      ("norm", ("layer", "rms")),
      ("ffw", ("mlp", "swiglu")),
      ("gate_shape", ("scalar", "vector")),
    ):
      if getattr(self, key) not in allowed:
        raise ValueError(f"xattn.{key} must be one of {allowed}, got {getattr(self, key)!r}")


class GatedXAttnParams(hk.Module):
  """Creates the stacked parameters of `num_blocks` blocks; returns them as a dict of arrays."""

  def __init__(self, cfg: XAttnConfig, dim: int, num_blocks: int, name: str = "gated_xattn"):
    super().__init__(name=name)
    self.cfg, self.dim, self.num_blocks = cfg, dim, num_blocks

  def __call__(self) -> dict:
    c, d, x = self.cfg, self.dim, self.num_blocks
    inner, hidden = c.num_heads * c.head_dim, c.ffw_hidden or c.ffw_mult * d
    init = layers.truncated_normal_init
    get = hk.get_parameter
    gate = [x, d] if c.gate_shape == "vector" else [x]
    layer_norm, swiglu = c.norm == "layer", c.ffw == "swiglu"
    # Created in a fixed order (the init RNG follows it): the paper's first, the flavours' extras after.
    p = {
      "attn_gate": get("attn_gate", gate, init=jnp.zeros),
      "ffw_gate": get("ffw_gate", gate, init=jnp.zeros),
      "attn_norm_scale": get("attn_norm_scale", [x, d], init=jnp.ones),
      "attn_norm_bias": get("attn_norm_bias", [x, d], init=jnp.zeros) if layer_norm else None,
      "q": get("q", [x, d, inner], init=init(d)),
      "k": get("k", [x, c.media_dim, inner], init=init(c.media_dim)),
      "v": get("v", [x, c.media_dim, inner], init=init(c.media_dim)),
      "o": get("o", [x, inner, d], init=init(inner)),
      "ffw_norm_scale": get("ffw_norm_scale", [x, d], init=jnp.ones),
      "ffw_norm_bias": get("ffw_norm_bias", [x, d], init=jnp.zeros) if layer_norm else None,
      "ffw_in": get("ffw_in", [x, d, hidden], init=init(d)),
      "ffw_out": get("ffw_out", [x, hidden, d], init=init(hidden)),
      "ffw_gate_in": get("ffw_gate_in", [x, d, hidden], init=init(d)) if swiglu else None,
      "q_norm": get("q_norm", [x, c.head_dim], init=jnp.ones) if c.qk_norm else None,
      "k_norm": get("k_norm", [x, c.head_dim], init=jnp.ones) if c.qk_norm else None,
    }
    return {name: value for name, value in p.items() if value is not None}


def num_xattn_blocks(num_layers: int, every: int, first: int = 0) -> int:
  """X: blocks before layers first, first + every, ... of an L-layer LM (0 when every is 0)."""
  return math.ceil((num_layers - first) / every) if every > 0 else 0


def media_kv(p: dict, visual: jax.Array, cfg: XAttnConfig, dtype):
  """Keys and values of the media tokens for every block at once.

  p: stacked params [X, ...]; visual: [B, N, R, Dr]. Returns k, v: [X, B, N*R, H, dh] (fp32).
  Computed once per media set; reused for every decoding step.
  """
  b, n, r, dr = visual.shape
  flat = visual.reshape(b, n * r, dr).astype(dtype)

  def project(w):
    out = layers.einsum("bmi,xio->xbmo", flat, w, dtype)
    return out.reshape(w.shape[0], b, n * r, cfg.num_heads, cfg.head_dim)

  k = project(p["k"])
  if cfg.qk_norm:  # each block's own scale [X, dh]
    k = layers.rms_norm(k, p["k_norm"][:, None, None, None, :], cfg.norm_eps)
  return k, project(p["v"])


def media_owner(num_media: int, tokens_per_media: int) -> jax.Array:
  """int32 [N*R]: the media item each flattened visual token belongs to."""
  return jnp.repeat(jnp.arange(num_media, dtype=jnp.int32), tokens_per_media)


def xattn_mask(media_index: jax.Array, owner: jax.Array, all_previous: bool = False) -> jax.Array:
  """[B, T, N*R] bool: token t may see media token m iff m belongs to media item phi(t) (phi >= 0),
  or with `all_previous` to any item up to phi(t).

  media_index: int [B, T]; owner: int [N*R] from `media_owner`."""
  phi, item = media_index[:, :, None], owner[None, None, :]
  return ((item <= phi) if all_previous else (item == phi)) & (phi >= 0)


def gated_xattn_block(
  p: dict, y: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: XAttnConfig, dtype
) -> jax.Array:
  """One block. p: this block's params (no X axis); y: [B, T, D] fp32; k, v: [B, N*R, H, dh];
  mask: [B, T, N*R]. Returns [B, T, D] fp32."""
  b, t, _ = y.shape
  h = _norm(y, p, "attn_norm", cfg)
  q = layers.matmul(h, p["q"], dtype).reshape(b, t, cfg.num_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = layers.rms_norm(q, p["q_norm"], cfg.norm_eps)
  attn = layers.attention(q, k, v, mask, dtype, implementation=cfg.attention).reshape(b, t, -1)
  gate = jnp.tanh if cfg.gating == "tanh" else (lambda alpha: 1.0)
  y = y + gate(p["attn_gate"]) * layers.matmul(attn, p["o"], dtype)
  h = _norm(y, p, "ffw_norm", cfg)
  if cfg.ffw == "swiglu":
    ffw = layers.swiglu_mlp(h, p["ffw_gate_in"], p["ffw_in"], p["ffw_out"], dtype)
  else:
    ffw = layers.mlp(h, p["ffw_in"], p["ffw_out"], cfg.ffw_activation, dtype)
  return y + gate(p["ffw_gate"]) * ffw


def _norm(y: jax.Array, p: dict, name: str, cfg: XAttnConfig) -> jax.Array:
  """LayerNorm (the paper, OpenFlamingo) or RMSNorm (IDEFICS) of the block's `name` norm."""
  if cfg.norm == "rms":
    return layers.rms_norm(y, p[f"{name}_scale"], cfg.norm_eps)
  return layers.layer_norm(y, p[f"{name}_scale"], p[f"{name}_bias"], cfg.norm_eps)
