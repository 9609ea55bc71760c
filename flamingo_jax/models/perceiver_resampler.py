"""Perceiver Resampler (paper §2.1, Fig. 3): a variable number of visual features -> R latent tokens.

Shapes: B batch, N media items, F frames, Lv visual tokens per frame, Dv vision width, Dr resampler width,
R latents, K = F*Lv + R keys.

    x = input_proj(features) + temporal_embed[f]     # [B, N, F*Lv, Dr]
    latents = learned [R, Dr]
    for each layer:  latents += Attn(q=latents, kv=concat(x, latents));  latents += FFW(latents)

Only temporal position embeddings are learned (no spatial ones); when more frames than trained are given,
they are linearly interpolated over time. Images are 1-frame videos.

`kind` (Table 3's resampler ablation; params under the same `perceiver_resampler/` path) replaces the
latents by the visual features themselves, so a medium gives F*Lv tokens instead of R:
  'mlp'          x += FFW(LN(x)), `depth` times, per token (a plain MLP over the visual features);
  'transformer'  x += SelfAttn(LN(x)); x += FFW(LN(x)), `depth` times (a plain transformer over them).
"""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
  dim: int = 576  # Dr
  depth: int = 6
  num_latents: int = 64  # R
  num_heads: int = 8
  head_dim: int = 64
  ffw_mult: int = 4
  max_frames: int = 8  # temporal embeddings learned (frames used in training)
  kind: str = "perceiver"  # 'perceiver' (the paper) | 'mlp' | 'transformer' (ablations)
  ffw_activation: str = "squared_relu"  # the paper's; 'gelu' in OpenFlamingo's, 'relu' in IDEFICS's
  qk_norm: bool = False  # IDEFICS: LayerNorm on each head's q and k

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"resampler.kind must be one of {KINDS}, got {self.kind!r}")
    if self.ffw_activation not in layers.ACTIVATIONS:
      raise ValueError(
        f"resampler.ffw_activation {self.ffw_activation!r} not in {sorted(layers.ACTIVATIONS)}"
      )


KINDS = ("perceiver", "mlp", "transformer")


def interpolate_time(table: jax.Array, num_frames: int) -> jax.Array:
  """Temporal embeddings for `num_frames` frames from a learned [Fmax, Dr] table.

  Fewer frames take the first rows (an image is frame 0); more frames are linearly interpolated, with the
  first and last rows kept at the ends.
  """
  fmax = table.shape[0]
  if num_frames <= fmax:
    return table[:num_frames]
  where = jnp.linspace(0.0, fmax - 1.0, num_frames)
  lo = jnp.floor(where).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, fmax - 1)
  frac = (where - lo)[:, None]
  return table[lo] * (1.0 - frac) + table[hi] * frac


class PerceiverResampler(hk.Module):
  """[B, N, F, Lv, Dv] visual features -> [B, N, R, Dr] media tokens ([B, N, F*Lv, Dr] for the
  'mlp' and 'transformer' kinds)."""

  def __init__(self, cfg: ResamplerConfig, dtype=jnp.float32, name: str = "perceiver_resampler"):
    super().__init__(name=name)
    self.cfg, self.dtype = cfg, dtype

  def __call__(self, features: jax.Array) -> jax.Array:
    c, dtype = self.cfg, self.dtype
    b, n, f, lv, dv = features.shape
    x = features.astype(jnp.float32)
    if dv != c.dim:
      w_in = hk.get_parameter("input_proj", [dv, c.dim], init=layers.truncated_normal_init(dv))
      x = layers.matmul(x, w_in, dtype)
    temporal = hk.get_parameter(
      "temporal_embed", [c.max_frames, c.dim], init=hk.initializers.TruncatedNormal(0.02)
    )
    x = x + interpolate_time(temporal, f)[None, None, :, None, :]
    x = x.reshape(b * n, f * lv, c.dim)
    if c.kind != "perceiver":  # ablations: the features themselves, F*Lv tokens per medium
      layer_cls = _MlpLayer if c.kind == "mlp" else _SelfAttentionLayer
      x = hk.layer_stack(c.depth, unroll=c.depth, name="layers")(
        lambda t: layer_cls(c, dtype, name="layer")(t)
      )(x)
      out = hk.LayerNorm(-1, True, True, name="final_norm")(x)
      return out.reshape(b, n, f * lv, c.dim)
    latents = hk.get_parameter("latents", [c.num_latents, c.dim], init=hk.initializers.TruncatedNormal(0.02))
    latents = jnp.broadcast_to(latents, (b * n, c.num_latents, c.dim)).astype(jnp.float32)

    def layer(latents):
      return _ResamplerLayer(c, dtype, name="layer")(latents, x)

    # Unrolled: XLA:CPU runs a gradient inside a loop several times slower (benchmarks/README.md);
    # the params stay stacked under `layers` either way.
    latents = hk.layer_stack(c.depth, unroll=c.depth, name="layers")(layer)(latents)
    out = hk.LayerNorm(-1, True, True, name="final_norm")(latents)
    return out.reshape(b, n, c.num_latents, c.dim)


class _ResamplerLayer(hk.Module):
  """One resampler layer: latents attend to concat(media, latents), then a squared-ReLU FFW."""

  def __init__(self, cfg: ResamplerConfig, dtype, name: str):
    super().__init__(name=name)
    self.cfg, self.dtype = cfg, dtype

  def __call__(self, latents: jax.Array, x: jax.Array) -> jax.Array:
    """latents: [B', R, Dr]; x: [B', F*Lv, Dr] (B' = B*N). Returns [B', R, Dr]."""
    c, dtype = self.cfg, self.dtype
    inner = c.num_heads * c.head_dim
    init = layers.truncated_normal_init
    get = hk.get_parameter
    media_n = hk.LayerNorm(-1, True, True, name="media_norm")(x)
    lat_n = hk.LayerNorm(-1, True, True, name="latent_norm")(latents)
    kv_in = jnp.concatenate([media_n, lat_n], axis=1)  # [B', K, Dr]
    bp, r, _ = latents.shape
    q = layers.matmul(lat_n, get("q", [c.dim, inner], init=init(c.dim)), dtype)
    k = layers.matmul(kv_in, get("k", [c.dim, inner], init=init(c.dim)), dtype)
    v = layers.matmul(kv_in, get("v", [c.dim, inner], init=init(c.dim)), dtype)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], c.num_heads, c.head_dim)
    q, k, v = split(q), split(k), split(v)
    if c.qk_norm:  # IDEFICS's qk_layer_norms_perceiver: a LayerNorm over each head's q and k
      q = hk.LayerNorm(-1, True, True, name="q_norm")(q)
      k = hk.LayerNorm(-1, True, True, name="k_norm")(k)
    mask = jnp.ones((bp, r, kv_in.shape[1]), bool)
    attn = layers.attention(q, k, v, mask, dtype).reshape(bp, r, inner)
    latents = latents + layers.matmul(attn, get("o", [inner, c.dim], init=init(inner)), dtype)
    return _ffw(c, latents, dtype)


def _ffw(c: ResamplerConfig, x: jax.Array, dtype) -> jax.Array:
  """x + FFW(LN(x)) (squared ReLU in the paper), the resampler's feed-forward sub-layer. x: [B', K, Dr]."""
  init, hidden = layers.truncated_normal_init, c.ffw_mult * c.dim
  h = hk.LayerNorm(-1, True, True, name="ffw_norm")(x)
  w_in = hk.get_parameter("ffw_in", [c.dim, hidden], init=init(c.dim))
  w_out = hk.get_parameter("ffw_out", [hidden, c.dim], init=init(hidden))
  return x + layers.mlp(h, w_in, w_out, c.ffw_activation, dtype)


class _MlpLayer(hk.Module):
  """Ablation 'mlp': one residual FFW per visual token, [B', K, Dr] -> [B', K, Dr]."""

  def __init__(self, cfg: ResamplerConfig, dtype, name: str):
    super().__init__(name=name)
    self.cfg, self.dtype = cfg, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return _ffw(self.cfg, x, self.dtype)


class _SelfAttentionLayer(hk.Module):
  """Ablation 'transformer': visual tokens attend to each other, then a FFW; [B', K, Dr] -> same."""

  def __init__(self, cfg: ResamplerConfig, dtype, name: str):
    super().__init__(name=name)
    self.cfg, self.dtype = cfg, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    c, dtype, init = self.cfg, self.dtype, layers.truncated_normal_init
    inner = c.num_heads * c.head_dim
    h = hk.LayerNorm(-1, True, True, name="media_norm")(x)
    bp, k, _ = x.shape

    def proj(name):
      w = hk.get_parameter(name, [c.dim, inner], init=init(c.dim))
      return layers.matmul(h, w, dtype).reshape(bp, k, c.num_heads, c.head_dim)

    mask = jnp.ones((bp, k, k), bool)
    attn = layers.attention(proj("q"), proj("k"), proj("v"), mask, dtype).reshape(bp, k, inner)
    x = x + layers.matmul(attn, hk.get_parameter("o", [inner, c.dim], init=init(inner)), dtype)
    return _ffw(c, x, dtype)
