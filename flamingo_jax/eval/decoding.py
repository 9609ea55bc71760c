"""Greedy decoding and beam search under `jax.jit` for a model given as two pure functions.

Model interface (the caller builds these on the model once and reuses the same function objects,
so repeated calls with the same shapes hit the jit cache):
  prefill(params, tokens [B,T] int32, token_mask [B,T] bool, **prefill_inputs)
      -> (logits [B,T,V], cache)     # the cache must have room for T + max_new_tokens positions
  decode_step(params, tokens [B,1] int32, cache) -> (logits [B,1,V], cache)
Prompts are LEFT-padded (token_mask marks valid tokens), so position T-1 holds every row's last
token. `prefill_inputs` is a dict of arrays (e.g. images) passed through to prefill.

The cache is any pytree; beam search gathers its batch rows (the first gather expands a B-row
prefill cache to B*K rows) along `cache_batch_axes`: a pytree like the cache whose leaves give each
leaf's batch axis (None: no batch axis, e.g. a scalar write index; `models/kv_cache.py: CACHE_BATCH_AXES`
for the Flamingo LM's cache).

Shapes: B batch, T prompt tokens, V vocabulary, K beams, N = max_new_tokens.
Outputs are tokens [B,N] (the stop token included, pad_id after it) and summed fp32 log-probs
(beam search: divided by the GNMT length penalty ((5 + len) / 6) ** alpha).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
PrefillFn = Callable[..., tuple[jax.Array, PyTree]]
DecodeStepFn = Callable[[PyTree, jax.Array, PyTree], tuple[jax.Array, PyTree]]
ReorderFn = Callable[[PyTree, jax.Array], PyTree]


class DecodeOutput(NamedTuple):
  tokens: jax.Array  # [B, N] int32, pad_id after the stop token
  scores: jax.Array  # [B] f32: greedy: summed log-prob; beam: length-normalised
  lengths: jax.Array  # [B] int32: generated tokens, stop token included


class BeamOutput(NamedTuple):
  tokens: jax.Array  # [B, N] the best hypothesis
  scores: jax.Array  # [B] its length-normalised score
  lengths: jax.Array  # [B]
  beam_tokens: jax.Array  # [B, K, N] all K final hypotheses, best first
  beam_scores: jax.Array  # [B, K]


class _AxesReorder:
  """`reorder_cache` from a `cache_batch_axes` pytree; hashable, so jit caches on its value."""

  def __init__(self, cache_batch_axes: PyTree):
    leaves, self._treedef = jax.tree.flatten(cache_batch_axes, is_leaf=lambda x: x is None)
    self._axes = tuple(None if a is None else int(a) for a in leaves)

  def __call__(self, cache: PyTree, indices: jax.Array) -> PyTree:
    def one(axis, leaf):  # leaf: an array, or None for a field the cache does not have
      return leaf if axis is None or leaf is None else jnp.take(leaf, indices, axis=axis)

    axes = jax.tree.unflatten(self._treedef, self._axes)
    try:
      return jax.tree.map(one, axes, cache, is_leaf=lambda x: x is None)
    except ValueError as e:
      raise ValueError(f"cache_batch_axes has the structure {self._treedef}; the cache: {e}") from None

  def _key(self):
    return (self._treedef, self._axes)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, _AxesReorder) and self._key() == other._key()


def _stop_mask(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(stop_ids, dtype=tokens.dtype))


def _as_ids(stop_ids: int | Sequence[int]) -> tuple[int, ...]:
  ids = (stop_ids,) if isinstance(stop_ids, int) else tuple(int(i) for i in stop_ids)
  if not ids:
    raise ValueError("stop_ids must name at least one token id (e.g. the <EOC> id)")
  return ids


def _check_prompt(tokens, token_mask, max_new_tokens):
  if tokens.ndim != 2 or token_mask.shape != tokens.shape:
    raise ValueError(
      f"tokens must be [B,T] with token_mask of the same shape, got {tokens.shape} and {token_mask.shape}"
    )
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def greedy_decode(
  prefill_fn: PrefillFn,
  decode_step_fn: DecodeStepFn,
  params: PyTree,
  tokens: jax.Array,
  token_mask: jax.Array,
  *,
  max_new_tokens: int,
  stop_ids: int | Sequence[int],
  pad_id: int,
  prefill_inputs: dict[str, Any] | None = None,
) -> DecodeOutput:
  """Greedy decoding in a `lax.while_loop` until every row emitted a stop id or N tokens.

  Args:
    prefill_fn, decode_step_fn: the model (see the module docstring); static: reuse the same
      function objects.
    params: model parameters.
    tokens: [B,T] left-padded prompts; token_mask: [B,T] bool.
    max_new_tokens: N.
    stop_ids: id or tuple of ids (e.g. (eoc_id, eos_id)) that end a sequence.
    pad_id: written after the stop token.
    prefill_inputs: extra keyword arrays for prefill_fn (e.g. images).
  """
  _check_prompt(tokens, token_mask, max_new_tokens)
  return _greedy_decode(
    prefill_fn,
    decode_step_fn,
    params,
    tokens,
    token_mask,
    max_new_tokens=max_new_tokens,
    stop_ids=_as_ids(stop_ids),
    pad_id=int(pad_id),
    prefill_inputs=prefill_inputs,
  )


@functools.partial(
  jax.jit, static_argnames=("prefill_fn", "decode_step_fn", "max_new_tokens", "stop_ids", "pad_id")
)
def _greedy_decode(
  prefill_fn, decode_step_fn, params, tokens, token_mask, *, max_new_tokens, stop_ids, pad_id, prefill_inputs
):
  batch = tokens.shape[0]
  logits, cache = prefill_fn(params, tokens, token_mask, **(prefill_inputs or {}))
  init = dict(
    step=jnp.int32(0),
    logits=logits[:, -1].astype(jnp.float32),  # [B, V]: predicts the token at `step`
    cache=cache,
    out=jnp.full([batch, max_new_tokens], pad_id, jnp.int32),
    done=jnp.zeros([batch], bool),
    scores=jnp.zeros([batch], jnp.float32),
    lengths=jnp.zeros([batch], jnp.int32),
  )

  def cond(s):
    return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

  def body(s):
    logp = jax.nn.log_softmax(s["logits"], axis=-1)
    tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    tok_logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    live = ~s["done"]
    tok = jnp.where(live, tok, pad_id)
    out = s["out"].at[:, s["step"]].set(tok)
    # One decode step per emitted token: the last one is unused but keeps the loop branch-free.
    logits, cache = decode_step_fn(params, tok[:, None], s["cache"])
    return dict(
      step=s["step"] + 1,
      logits=logits[:, -1].astype(jnp.float32),
      cache=cache,
      out=out,
      done=s["done"] | (live & _stop_mask(tok, stop_ids)),
      scores=s["scores"] + jnp.where(live, tok_logp, 0.0),
      lengths=s["lengths"] + live.astype(jnp.int32),
    )

  s = jax.lax.while_loop(cond, body, init)
  return DecodeOutput(tokens=s["out"], scores=s["scores"], lengths=s["lengths"])


def length_penalty(length: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016)."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(
  prefill_fn: PrefillFn,
  decode_step_fn: DecodeStepFn,
  params: PyTree,
  tokens: jax.Array,
  token_mask: jax.Array,
  *,
  max_new_tokens: int,
  stop_ids: int | Sequence[int],
  pad_id: int,
  num_beams: int = 3,
  alpha: float = 0.6,
  cache_batch_axes: PyTree,
  prefill_inputs: dict[str, Any] | None = None,
) -> BeamOutput:
  """Beam search with fixed shapes in a `lax.while_loop`.

  Each step extends the K alive beams, keeps the best K continuations that did not stop as the new
  alive beams, and moves the continuations among the step's top K that end in a stop id into the
  K-best finished pool, scored by log-prob / length_penalty(length, alpha). The loop ends after N
  steps or once no alive beam can beat the worst finished one. A batch row without any finished
  hypothesis returns its alive beams (truncated, scored with their length). Empty slots of the
  finished pool have score -inf.

  Args: as `greedy_decode`, plus
    num_beams: K (default 3 as in Flamingo).
    alpha: length penalty exponent (0: plain summed log-prob); traced: changing it does not
      recompile.
    cache_batch_axes: the batch axis of each cache leaf (None: shared by the batch), e.g.
      `models/kv_cache.py: CACHE_BATCH_AXES`; beams gather their cache rows along it.
  """
  _check_prompt(tokens, token_mask, max_new_tokens)
  reorder_cache = _AxesReorder(cache_batch_axes)  # hashable: jit caches on the axes' value
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  return _beam_search(
    prefill_fn,
    decode_step_fn,
    params,
    tokens,
    token_mask,
    max_new_tokens=max_new_tokens,
    stop_ids=_as_ids(stop_ids),
    pad_id=int(pad_id),
    num_beams=int(num_beams),
    alpha=jnp.float32(alpha),
    reorder_cache=reorder_cache,
    prefill_inputs=prefill_inputs,
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "prefill_fn",
    "decode_step_fn",
    "max_new_tokens",
    "stop_ids",
    "pad_id",
    "num_beams",
    "reorder_cache",
  ),
)
def _beam_search(
  prefill_fn,
  decode_step_fn,
  params,
  tokens,
  token_mask,
  *,
  max_new_tokens,
  stop_ids,
  pad_id,
  num_beams,
  alpha,
  reorder_cache,
  prefill_inputs,
):
  """The jitted beam search. Long: one `lax.while_loop` whose state every part of the step shares."""
  batch, k, n = tokens.shape[0], num_beams, max_new_tokens
  logits, cache = prefill_fn(params, tokens, token_mask, **(prefill_inputs or {}))
  vocab = logits.shape[-1]
  num_cand = min(k * (1 + len(stop_ids)), k * vocab)  # enough that K candidates did not stop
  batch_offsets = (jnp.arange(batch, dtype=jnp.int32) * k)[:, None]  # [B, 1]
  cache = reorder_cache(cache, jnp.repeat(jnp.arange(batch, dtype=jnp.int32), k))  # B -> B*K rows
  neg_inf = jnp.float32(-jnp.inf)
  init = dict(
    step=jnp.int32(0),
    logits=jnp.repeat(logits[:, -1].astype(jnp.float32), k, axis=0),  # [B*K, V]
    cache=cache,
    alive_seqs=jnp.full([batch, k, n], pad_id, jnp.int32),
    # Only beam 0 is live at first: the K copies of the prompt must not yield duplicates.
    alive_logp=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf), (batch, 1)),
    fin_seqs=jnp.full([batch, k, n], pad_id, jnp.int32),
    fin_scores=jnp.full([batch, k], neg_inf),
    fin_lengths=jnp.zeros([batch, k], jnp.int32),
  )
  best_possible_lp = jnp.maximum(length_penalty(jnp.int32(1), alpha), length_penalty(jnp.int32(n), alpha))

  def cond(s):
    # Log-probs only decrease, so an alive beam's best final score is logp / (largest penalty).
    best_alive = s["alive_logp"][:, 0] / best_possible_lp
    worst_fin = s["fin_scores"][:, -1]
    can_improve = jnp.any(best_alive > worst_fin)
    return (s["step"] < n) & can_improve

  def body(s):
    step = s["step"]
    logp = jax.nn.log_softmax(s["logits"], axis=-1).reshape(batch, k, vocab)
    cand = (s["alive_logp"][:, :, None] + logp).reshape(batch, k * vocab)
    cand_logp, flat = jax.lax.top_k(cand, num_cand)  # [B, C]
    parent = (flat // vocab).astype(jnp.int32)
    tok = (flat % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(s["alive_seqs"], parent[:, :, None], axis=1)
    seqs = seqs.at[:, :, step].set(tok)  # [B, C, N]
    stopped = _stop_mask(tok, stop_ids)

    # New alive beams: the best K candidates that did not stop.
    alive_logp, pick = jax.lax.top_k(jnp.where(stopped, neg_inf, cand_logp), k)
    alive_seqs = jnp.take_along_axis(seqs, pick[:, :, None], axis=1)
    alive_parent = jnp.take_along_axis(parent, pick, axis=1)  # [B, K]
    alive_tok = jnp.take_along_axis(tok, pick, axis=1)

    # Finished pool: the best K of (old finished, candidates that stopped now).
    length = step + 1
    # As in Hugging Face beam search, a stopped candidate counts only if it ranks among the top K
    # continuations of this step (so K = 1 with alpha = 0 is exactly greedy decoding).
    in_top_k = (jnp.arange(num_cand) < k)[None, :]
    new_scores = jnp.where(
      stopped & in_top_k & jnp.isfinite(cand_logp), cand_logp / length_penalty(length, alpha), neg_inf
    )
    all_scores = jnp.concatenate([s["fin_scores"], new_scores], axis=1)
    all_seqs = jnp.concatenate([s["fin_seqs"], seqs], axis=1)
    all_lengths = jnp.concatenate([s["fin_lengths"], jnp.full(new_scores.shape, length, jnp.int32)], axis=1)
    fin_scores, fin_pick = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, fin_pick[:, :, None], axis=1)
    fin_lengths = jnp.take_along_axis(all_lengths, fin_pick, axis=1)

    cache = reorder_cache(s["cache"], (alive_parent + batch_offsets).reshape(-1))
    logits, cache = decode_step_fn(params, alive_tok.reshape(batch * k, 1), cache)
    return dict(
      step=step + 1,
      logits=logits[:, -1].astype(jnp.float32),
      cache=cache,
      alive_seqs=alive_seqs,
      alive_logp=alive_logp,
      fin_seqs=fin_seqs,
      fin_scores=fin_scores,
      fin_lengths=fin_lengths,
    )

  s = jax.lax.while_loop(cond, body, init)
  # Rows where nothing finished: fall back to the alive beams, truncated at the last step taken.
  none_finished = ~jnp.isfinite(s["fin_scores"][:, 0])[:, None]  # [B, 1]
  alive_scores = s["alive_logp"] / length_penalty(s["step"], alpha)
  beam_scores = jnp.where(none_finished, alive_scores, s["fin_scores"])
  beam_tokens = jnp.where(none_finished[:, :, None], s["alive_seqs"], s["fin_seqs"])
  lengths = jnp.where(none_finished, s["step"], s["fin_lengths"])
  return BeamOutput(
    tokens=beam_tokens[:, 0],
    scores=beam_scores[:, 0],
    lengths=lengths[:, 0],
    beam_tokens=beam_tokens,
    beam_scores=beam_scores,
  )
