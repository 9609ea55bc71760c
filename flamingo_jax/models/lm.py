"""The decoder language model (frozen in Flamingo) with GATED XATTN-DENSE blocks interleaved.

Shapes: B batch, T tokens, S cache slots, L layers, X xattn blocks, D width, V vocabulary, E extra tokens,
Hq/Hkv query/key-value heads, dh head dim, N media items, R visual tokens per item, M = N*R.

All L layers' parameters are stacked on a leading axis (`lm/layers`) and run by `lax.scan`, MaxText style,
so compile time does not grow with depth. Xattn block x sits before layer first + x*every (`first` 0 in
the paper, every - 1 in OpenFlamingo): the `first` layers run as one group without a block, then the
scan runs over `(L - first) // every` groups of (one block, `every` layers), then a tail group. A
group reads its layers by a dynamic slice of the [L, ...] stack inside the loop (slicing outside copies
the whole LM on XLA:CPU). A group's `every` layers are unrolled (a nested scan costs ~25% of the step on
XLA:CPU); `scan_unroll` > 1 unrolls that many groups per iteration. Cached calls of fewer than
`UNROLL_MIN_TOKENS` tokens (decoding) run one flat scan over the L layers, each xattn block under
`lax.cond`: XLA:CPU copies an unrolled layer's static weight slice into fresh buffers on every call
(~7x a batch-1 step's weight reads), while a flat scan's dynamic slice per layer stays cache-sized.

Two LM families: Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU; SmolLM2) and the paper's
Chinchilla-style GELU MLP with LayerNorm (3B/9B/80B sizes; RoPE stands in for its relative positions).
"""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import gated_xattn, layers
from flamingo_jax.models.gated_xattn import num_xattn_blocks
from flamingo_jax.models.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = 49152  # V, the original vocabulary
  dim: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  ffw_hidden: int = 1536
  mlp: str = "swiglu"  # 'swiglu' | 'gelu'
  norm: str = "rms"  # 'rms' | 'layer'
  norm_eps: float = 1e-5
  rope_theta: float = 100000.0
  tie_embeddings: bool = True
  max_seq_len: int = 8192
  num_extra_tokens: int = 2  # E: <image> = V, <EOC> = V+1

  @classmethod
  def from_dict(cls, d) -> "LMConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise KeyError(f"Unknown LM config keys: {sorted(unknown)}")
    return cls(**d)


# The residual stream [B, T, D] is placed by these logical axes at the input and output of every
# decoder layer and xattn block (the training set-up maps them to mesh axes; without it, on meshes
# with 'fsdp', XLA keeps most activations replicated over 'fsdp': docs/TPU.md).
RESIDUAL_AXES = ("batch", "length", "embed")

# Cached calls (decoding) below this many tokens (B*T) run one flat scan (module docstring); never training:
UNROLL_MIN_TOKENS = 256  # a gradient through a scan's dynamic weight slices is several times slower there


def _decoder_layer(p: dict, x, cos, sin, mask, cfg: LMConfig, dtype, cache_kv=None, index=None):
  """One pre-norm decoder layer. x: [B, T, D] fp32; mask: [B, T, S] where S = T, or the cache length.

  With `cache_kv = (k, v)` [B, S, Hkv, dh], this step's K/V are written at slot `index` and attention runs
  over the whole cache. Returns (x, (k, v) or None).
  """
  b, t, _ = x.shape
  if cfg.norm == "rms":
    h = layers.rms_norm(x, p["attn_norm"], cfg.norm_eps)
  else:
    h = layers.layer_norm(x, p["attn_norm"], p["attn_norm_bias"], cfg.norm_eps)
  q = layers.matmul(h, p["q"], dtype).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = layers.matmul(h, p["k"], dtype).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = layers.matmul(h, p["v"], dtype).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
  new_kv = None
  if cache_kv is not None:
    ck, cv = cache_kv
    k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
    new_kv = (k, v)
  attn = layers.attention(q, k, v, mask, dtype).reshape(b, t, -1)
  x = x + layers.matmul(attn, p["o"], dtype)
  if cfg.norm == "rms":
    h = layers.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
  else:
    h = layers.layer_norm(x, p["mlp_norm"], p["mlp_norm_bias"], cfg.norm_eps)
  if cfg.mlp == "swiglu":
    x = x + layers.swiglu_mlp(h, p["gate"], p["up"], p["down"], dtype)
  else:
    x = x + layers.mlp(h, p["up"], p["down"], "gelu_tanh", dtype)
  return x, new_kv


def _layer_params(c: LMConfig) -> dict:
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


def _embeddings(c: LMConfig):
  """Frozen table [V, D] and trainable extra rows [E, D]."""
  with hk.experimental.name_scope("embed"):
    table = hk.get_parameter("embeddings", [c.vocab_size, c.dim], init=hk.initializers.TruncatedNormal(1.0))
  with hk.experimental.name_scope("extra_embed"):
    extra = hk.get_parameter(
      "embeddings", [c.num_extra_tokens, c.dim], init=hk.initializers.TruncatedNormal(0.02)
    )
  return table, extra


def _output_weights(c: LMConfig, table, extra):
  """[D, V] and [D, E] output projections (the embedding rows when tied)."""
  if c.tie_embeddings:
    return table.T, extra.T
  with hk.experimental.name_scope("unembed"):
    w = hk.get_parameter("w", [c.dim, c.vocab_size], init=layers.truncated_normal_init(c.dim))
  with hk.experimental.name_scope("extra_unembed"):
    w_extra = hk.get_parameter("w", [c.dim, c.num_extra_tokens], init=layers.truncated_normal_init(c.dim))
  return w, w_extra


def _final_norm(c: LMConfig, x):
  with hk.experimental.name_scope("final_norm"):
    scale = hk.get_parameter("scale", [c.dim], init=jnp.ones)
    if c.norm == "rms":
      return layers.rms_norm(x, scale, c.norm_eps)
    bias = hk.get_parameter("bias", [c.dim], init=jnp.zeros)
    return layers.layer_norm(x, scale, bias, c.norm_eps)


class DecoderLM(hk.Module):
  """Decoder LM + interleaved gated cross-attention. See the module docstring for the layout."""

  def __init__(
    self,
    cfg: LMConfig,
    xattn: gated_xattn.XAttnConfig | None = None,
    dtype=jnp.float32,
    remat: str = "none",
    scan_unroll: int = 1,
    constrain: layers.ActivationConstraint = layers.no_constraint,
    name: str = "lm",
  ):
    super().__init__(name=name)
    self.cfg, self.xcfg, self.dtype, self.remat = cfg, xattn, dtype, remat
    self.scan_unroll = scan_unroll
    self.constrain = constrain
    self.num_blocks = num_xattn_blocks(cfg.num_layers, xattn.every, xattn.first) if xattn else 0

  # ---------------------------------------------------------------------------------------- forward
  def __call__(
    self,
    tokens: jax.Array,
    *,
    visual: jax.Array | None = None,
    media_index: jax.Array | None = None,
    token_mask: jax.Array | None = None,
    cache: KVCache | None = None,
    lm_only: bool = False,
  ):
    """Logits for `tokens` [B, T].

    Args:
      visual: [B, N, R, Dr] media tokens (from the resampler), or None (no media / media K/V in `cache`).
      media_index: int [B, T], phi per token (-1 none). Defaults to -1 everywhere, or with a cache to
        the last media index of the prompt (decoding continues to look at the last image).
      token_mask: bool [B, T] valid (non-padding) tokens; default all valid.
      cache: from `init_cache`; when given, this call appends T tokens at slot `cache.index`.
      lm_only: skip the xattn blocks entirely (the plain frozen LM; same params).

    Returns:
      (logits [B, T, V+E] fp32, updated cache or None).

    Long: the forward with and without a KV cache shares its embedding, masks and head.
    """
    c, dtype = self.cfg, self.dtype
    b, t = tokens.shape
    if token_mask is None:
      token_mask = jnp.ones((b, t), bool)
    table, extra = _embeddings(c)
    p_layers = _layer_params(c)
    use_xattn = self.num_blocks > 0 and not lm_only
    p_x = gated_xattn.GatedXAttnParams(self.xcfg, c.dim, self.num_blocks)() if self.num_blocks else None

    # Embedding lookup: original rows frozen, extra rows (<image>, <EOC>) trainable.
    is_extra = tokens >= c.vocab_size
    x = jnp.where(
      is_extra[..., None],
      jnp.take(extra, jnp.clip(tokens - c.vocab_size, 0, c.num_extra_tokens - 1), axis=0),
      jnp.take(table, jnp.clip(tokens, 0, c.vocab_size - 1), axis=0),
    ).astype(jnp.float32)

    # Positions, self-attention mask and the media K/V.
    if cache is None:
      positions = layers.positions_from_mask(token_mask)
      self_mask = layers.causal_mask(token_mask)
      index = None
    else:
      index = cache.index
      positions = layers.positions_from_mask(token_mask, cache.positions)
      valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_mask, index, axis=1)
      slots = jnp.arange(valid.shape[1])
      query_slots = index + jnp.arange(t)
      self_mask = (slots[None, None, :] <= query_slots[None, :, None]) & valid[:, None, :]
    cos, sin = layers.rope_angles(positions, c.head_dim, c.rope_theta)

    media_k = media_v = xmask = None
    if use_xattn:
      if visual is not None:
        media_k, media_v = gated_xattn.media_kv(p_x, visual, self.xcfg, dtype)
        num_media, per_media = visual.shape[1], visual.shape[2]
        owner = gated_xattn.media_owner(num_media, per_media)
      elif cache is not None and cache.xattn_k is not None:
        media_k, media_v, owner = cache.xattn_k, cache.xattn_v, cache.xattn_owner
      if media_index is None:
        media_index = (
          jnp.broadcast_to(cache.last_media[:, None], (b, t))
          if cache is not None
          else jnp.full((b, t), -1, jnp.int32)
        )
      if media_k is None or media_k.shape[2] == 0:
        # No media tokens at all: attention contributes exactly zero; keep shapes static with one dummy.
        xdim = (self.num_blocks, b, 1, self.xcfg.num_heads, self.xcfg.head_dim)
        media_k = media_v = jnp.zeros(xdim, jnp.float32)
        xmask = jnp.zeros((b, t, 1), bool)
      else:
        xmask = gated_xattn.xattn_mask(media_index, owner, self.xcfg.media_attention == "all_previous")

    x, new_kv = self._run_layers(
      x, p_layers, p_x if use_xattn else None, cos, sin, self_mask, media_k, media_v, xmask, cache, index
    )
    h = _final_norm(c, x)
    w_out, w_extra = _output_weights(c, table, extra)
    logits = jnp.concatenate([layers.matmul(h, w_out, dtype), layers.matmul(h, w_extra, dtype)], axis=-1)

    new_cache = None
    if cache is not None:
      new_cache = cache._replace(
        k=new_kv[0],
        v=new_kv[1],
        valid=valid,
        index=index + t,
        positions=cache.positions + jnp.sum(token_mask, axis=1).astype(jnp.int32),
      )
      if use_xattn and cache.xattn_k is not None:
        if visual is not None:
          new_cache = new_cache._replace(
            xattn_k=media_k.astype(cache.xattn_k.dtype), xattn_v=media_v.astype(cache.xattn_v.dtype)
          )
        new_cache = new_cache._replace(last_media=media_index[:, -1])
    return logits, new_cache

  # ------------------------------------------------------------------------------------------ layers
  def _run_layers(self, x, p_layers, p_x, cos, sin, self_mask, media_k, media_v, xmask, cache, index):
    """Scan over groups of (xattn block, `every` layers). Returns (x, (k, v) stacked [L, ...] or None).

    Long: the grouped scan over (xattn block, layers) with its cache plumbing.
    """
    c, dtype = self.cfg, self.dtype
    every = self.xcfg.every if (self.xcfg and self.num_blocks) else c.num_layers
    first = self.xcfg.first if (self.xcfg and self.num_blocks) else 0  # plain layers before block 0
    n_groups, tail = (c.num_layers - first) // every, (c.num_layers - first) % every
    use_cache = cache is not None
    if cache is not None and x.shape[0] * x.shape[1] < UNROLL_MIN_TOKENS:  # static: decoding steps
      return self._run_layers_flat(
        x, p_layers, p_x, cos, sin, self_mask, media_k, media_v, xmask, cache, index, every, first
      )

    residual = lambda x: self.constrain(x, RESIDUAL_AXES)

    def group_fn(x, xs):
      p_block, p_group, kv_group, mk, mv = xs
      if p_block is not None:
        x = residual(gated_xattn.gated_xattn_block(p_block, residual(x), mk, mv, xmask, self.xcfg, dtype))

      def layer_fn(x, layer_xs):
        p_layer, kv = layer_xs
        x, kv = _decoder_layer(p_layer, residual(x), cos, sin, self_mask, c, dtype, kv, index)
        return residual(x), kv

      return jax.lax.scan(layer_fn, x, (p_group, kv_group), unroll=True)

    def indexed_group_fn(x, xs):
      """A main group: its layers are a dynamic slice of the [L, ...] stack taken inside the
      (rematerialised) group, so a backward re-reads them instead of keeping a copy."""
      p_block, g, kv_group, mk, mv = xs
      start = g * every + first if first else g * every
      p_group = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, every), p_layers)
      return group_fn(x, (p_block, p_group, kv_group, mk, mv))

    def split(tree, n_main, size, axis0_total):
      """Leading axis [total] -> ([n_main, size, ...], tail [rest, ...])."""
      main = jax.tree.map(lambda a: a[: n_main * size].reshape((n_main, size) + a.shape[1:]), tree)
      rest = jax.tree.map(lambda a: a[n_main * size : axis0_total], tree)
      return main, rest

    kv = (cache.k, cache.v) if use_cache else None
    kv_head = None
    if first:  # layers before the first block (OpenFlamingo's placement): one group without a block
      kv_head = jax.tree.map(lambda a: a[:first], kv) if use_cache else None
      p_head = jax.tree.map(lambda a: a[:first], p_layers)
      x, kv_head = self._maybe_remat(group_fn)(x, (None, p_head, kv_head, None, None))
      kv = jax.tree.map(lambda a: a[first:], kv) if use_cache else None
    # The main groups index the stacked weights inside the loop (a slice [:n_groups*every] taken
    # outside would be a copy of the whole LM's weights on XLA:CPU); the tail is sliced (< every layers).
    group_index = jnp.arange(n_groups, dtype=jnp.int32)
    p_tail = jax.tree.map(lambda a: a[first + n_groups * every :], p_layers)
    kv_main, kv_tail = split(kv, n_groups, every, c.num_layers - first) if use_cache else (None, None)
    if p_x is not None:
      px_main = jax.tree.map(lambda a: a[:n_groups], p_x)
      px_tail = jax.tree.map(lambda a: a[n_groups], p_x) if tail else None
      mk_main, mv_main = media_k[:n_groups], media_v[:n_groups]
      mk_tail, mv_tail = (media_k[n_groups], media_v[n_groups]) if tail else (None, None)
    else:
      px_main = px_tail = mk_main = mv_main = mk_tail = mv_tail = None

    x, kv_out = jax.lax.scan(
      self._maybe_remat(indexed_group_fn),
      x,
      (px_main, group_index, kv_main, mk_main, mv_main),
      unroll=max(1, min(self.scan_unroll, n_groups)),
    )
    if use_cache:
      kv_out = jax.tree.map(lambda a: a.reshape((n_groups * every,) + a.shape[2:]), kv_out)
    if tail:
      x, kv_tail_out = self._maybe_remat(group_fn)(x, (px_tail, p_tail, kv_tail, mk_tail, mv_tail))
      if use_cache:
        kv_out = jax.tree.map(lambda a, b_: jnp.concatenate([a, b_], axis=0), kv_out, kv_tail_out)
    if use_cache and first:
      kv_out = jax.tree.map(lambda a, b_: jnp.concatenate([a, b_], axis=0), kv_head, kv_out)
    return x, kv_out

  def _maybe_remat(self, fn):
    if self.remat == "none":
      return fn
    policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[self.remat]
    return jax.checkpoint(fn, policy=policy)

  def _run_layers_flat(
    self, x, p_layers, p_x, cos, sin, self_mask, media_k, media_v, xmask, cache, index, every, first
  ):
    """One `lax.scan` over the L layers; block (l - first) // every runs before layer l when
    l >= first and (l - first) % every == 0.

    The same function as the grouped scan of `_run_layers` (tested), for small calls. Returns (x, (k, v)
    stacked [L, ...] or None)."""
    c, dtype = self.cfg, self.dtype

    def layer_fn(x, xs):
      layer, p_layer, kv = xs
      if p_x is not None:

        def block(x):
          pick = lambda a: jax.lax.dynamic_index_in_dim(a, (layer - first) // every, keepdims=False)
          return gated_xattn.gated_xattn_block(
            jax.tree.map(pick, p_x), x, pick(media_k), pick(media_v), xmask, self.xcfg, dtype
          )

        has_block = (layer % every == 0) if not first else (layer >= first) & ((layer - first) % every == 0)
        x = jax.lax.cond(has_block, block, lambda x: x, x)
      return _decoder_layer(p_layer, x, cos, sin, self_mask, c, dtype, kv, index)

    kv = (cache.k, cache.v) if cache is not None else None
    return jax.lax.scan(self._maybe_remat(layer_fn), x, (jnp.arange(c.num_layers), p_layers, kv))
