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

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import gated_xattn, layers
from flamingo_jax.models.gated_xattn import num_xattn_blocks
from flamingo_jax.models.kv_cache import KVCache
from flamingo_jax.models.lm_layers import (  # noqa: F401  (LMConfig: the LM's config, re-exported)
  Head,
  LMConfig,
  Position,
  decoder_layer,
  embeddings,
  final_norm,
  head_logits,
  layer_params,
  output_weights,
)

# The residual stream [B, T, D] is placed by these logical axes at the input and output of every
# decoder layer and xattn block (the training set-up maps them to mesh axes; without it, on meshes
# with 'fsdp', XLA keeps most activations replicated over 'fsdp': docs/TPU.md).
RESIDUAL_AXES = ("batch", "length", "embed")

# Cached calls (decoding) below this many tokens (B*T) run one flat scan (module docstring); never training:
UNROLL_MIN_TOKENS = 256  # a gradient through a scan's dynamic weight slices is several times slower there


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
    output: str = "logits",
  ):
    """Logits for `tokens` [B, T].

    Args:
      visual: [B, N, R, Dr] media tokens (from the resampler), or None (no media / media K/V in `cache`).
      media_index: int [B, T], phi per token (-1 none). Defaults to -1 everywhere, or with a cache to
        the last media index of the prompt (decoding continues to look at the last image).
      token_mask: bool [B, T] valid (non-padding) tokens; default all valid.
      cache: from `init_cache`; when given, this call appends T tokens at slot `cache.index`.
      lm_only: skip the xattn blocks entirely (the plain frozen LM; same params).
      output: 'logits', or 'head_inputs': `Head` (final hidden states and the output weights) in place
        of the logits, so that a loss can form the [B, T, V+E] logits a chunk at a time.

    Returns:
      (logits [B, T, V+E] fp32 or `Head`, updated cache or None).

    Long: the forward with and without a KV cache shares its embedding, masks and head.
    """
    c, dtype = self.cfg, self.dtype
    b, t = tokens.shape
    if token_mask is None:
      token_mask = jnp.ones((b, t), bool)
    table, extra = embeddings(c)
    p_layers = layer_params(c)
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
    if c.position == "rope":
      pos = Position(*layers.rope_angles(positions, c.head_dim, c.rope_theta), None)
    else:  # ALiBi: a key's position is the count of valid slots before it
      key_positions = positions if cache is None else jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
      slopes = layers.alibi_slopes(c.num_heads, c.alibi_bias_max)
      pos = Position(None, None, layers.alibi_bias(slopes, positions, key_positions))

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
      x, p_layers, p_x if use_xattn else None, pos, self_mask, media_k, media_v, xmask, cache, index
    )
    head = Head(final_norm(c, x), *output_weights(c, table, extra))
    if output not in ("logits", "head_inputs"):
      raise ValueError(f"output must be 'logits' or 'head_inputs', got {output!r}")
    logits = head_logits(head, dtype) if output == "logits" else head

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
  def _run_layers(self, x, p_layers, p_x, pos, self_mask, media_k, media_v, xmask, cache, index):
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
        x, p_layers, p_x, pos, self_mask, media_k, media_v, xmask, cache, index, every, first
      )

    residual = lambda x: self.constrain(x, RESIDUAL_AXES)

    def group_fn(x, xs):
      p_block, p_group, kv_group, mk, mv = xs
      if p_block is not None:
        x = residual(gated_xattn.gated_xattn_block(p_block, residual(x), mk, mv, xmask, self.xcfg, dtype))

      def layer_fn(x, layer_xs):
        p_layer, kv = layer_xs
        x, kv = decoder_layer(p_layer, residual(x), pos, self_mask, c, dtype, kv, index)
        return residual(x), kv

      return jax.lax.scan(layer_fn, x, (p_group, kv_group), unroll=True)

    def indexed_group_fn(x, xs):
      """A main group: its layers are a dynamic slice of the [L, ...] stack taken inside the
      (rematerialised) group, so a backward re-reads them instead of keeping a copy."""
      p_block, g, kv_group, mk, mv = xs
      start = first + g * every
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
    # Under remat the main groups index the stacked weights inside the loop (a slice [:n_groups*every]
    # taken outside is a copy of the whole LM's weights on XLA:CPU); the tail is sliced (< every layers).
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

    if self.remat == "none":
      # Without remat a slice taken inside the loop is a value the backward keeps: JAX would stack a
      # copy of every layer's weights. As the loop's input, the backward reads them in place.
      p_main, _ = split(jax.tree.map(lambda a: a[first:], p_layers), n_groups, every, c.num_layers - first)
      body, xs = group_fn, (px_main, p_main, kv_main, mk_main, mv_main)
    else:
      body, xs = self._maybe_remat(indexed_group_fn), (px_main, group_index, kv_main, mk_main, mv_main)
    x, kv_out = jax.lax.scan(body, x, xs, unroll=max(1, min(self.scan_unroll, n_groups)))
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
    policy = {
      "full": None,
      "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "names": jax.checkpoint_policies.save_only_these_names(*layers.SAVED_ACTIVATIONS),
    }[self.remat]
    return jax.checkpoint(fn, policy=policy)

  def _run_layers_flat(
    self, x, p_layers, p_x, pos, self_mask, media_k, media_v, xmask, cache, index, every, first
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

        has_block = (layer >= first) & ((layer - first) % every == 0)
        x = jax.lax.cond(has_block, block, lambda x: x, x)
      return decoder_layer(p_layer, x, pos, self_mask, c, dtype, kv, index)

    kv = (cache.k, cache.v) if cache is not None else None
    return jax.lax.scan(self._maybe_remat(layer_fn), x, (jnp.arange(c.num_layers), p_layers, kv))
