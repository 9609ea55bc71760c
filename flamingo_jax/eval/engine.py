"""Flamingo inference for few-shot evaluation: media encoding, KV-cache decoding, candidate scoring.

Shapes: B prompts per call (batch_size), T prompt tokens (left-padded), N media per prompt,
F frames, S image side, U distinct media of a batch, R latents, Dr their width, Dv pooled vision
width, K beams, V vocabulary.

`EvalModel(model, tokenizer, ...)` wraps `models/flamingo.py: FlamingoModel`; its functions are
built once per instance, so every later call with the same shapes hits jit's cache:
  encode(params, refs, load)      -> visual tokens [len(refs), R, Dr] (fixed-size vision calls)
  features(params, refs, load)    -> pooled frozen-vision features [len(refs), Dv] (RICES)
  generate(params, prompts, media, load, prompt_len=T, max_new_tokens=...) -> generated ids
  rank(params, prompts, media, candidates, load, prompt_len=T) -> scoring.RankingResult
  generate_and_score(params, prompts, media, continuations, load, prompt_len=T, ...)
                                  -> (generated ids, summed log-probs [Q, C] of C continuations
                                     per prompt), one prefill for both
Each distinct medium is encoded once and its visual tokens stay in an LRU cache (per params) for
later batches and runs. Prefill runs the prompt minus its last token (whose logits are never
computed), keeps only the media K/V of each row's last medium (the query's: all that decoding
attends to), then runs the last token; decoding is `eval/decoding.py` (greedy or beam search).
`lm_only=True` is the frozen LM alone: no cross-attention, no media.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Hashable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.eval import decoding, scoring
from flamingo_jax.models import kv_cache, masking


def bucket(length: int, multiple: int) -> int:
  """`length` rounded up to a multiple of `multiple`."""
  return -(-int(length) // multiple) * multiple


def _left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int):
  """(tokens int32 [len(rows), length] left-padded with pad_id, token_mask bool [.., length])."""
  tokens = np.full([len(rows), length], pad_id, np.int32)
  mask = np.zeros([len(rows), length], bool)
  for i, ids in enumerate(rows):
    if len(ids) > length:
      raise ValueError(f"Prompt {i} has {len(ids)} tokens > the padded length {length}")
    tokens[i, length - len(ids) :] = ids
    mask[i, length - len(ids) :] = True
  return tokens, mask


def _prefilled(params, tokens, token_mask, logits, cache):
  """A prefill function that hands back a prefill already computed (its outputs as inputs)."""
  del params, tokens, token_mask
  return logits, cache


def _last_media_only(cache: kv_cache.KVCache, tokens_per_media: int) -> kv_cache.KVCache:
  """Keeps the media K/V of each row's last medium (all decoding attends to), as medium 0."""
  x, b, nr, h, d = cache.xattn_k.shape  # [X, B, N*R, H, dh]
  row = jnp.maximum(cache.last_media, 0)[None, :, None, None, None, None]

  def pick(kv):  # -> [X, B, R, H, dh] (R = tokens_per_media)
    return jnp.take_along_axis(kv.reshape(x, b, nr // tokens_per_media, tokens_per_media, h, d), row, axis=2)[
      :, :, 0
    ]

  return cache._replace(
    xattn_k=pick(cache.xattn_k),
    xattn_v=pick(cache.xattn_v),
    xattn_owner=jnp.zeros([tokens_per_media], jnp.int32),
    last_media=jnp.where(cache.last_media >= 0, 0, -1),
  )


class EvalModel:
  """A Flamingo (`models/flamingo.py: FlamingoModel`) wired for evaluation, compiled once per shape.

  Decoding stops at `<EOC>`, EOS or (when the tokenizer adds no BOS) the document separator;
  `banned_ids` are never generated. `max_traces` (tests) wraps every traced function in
  `chex.assert_max_traces(n=max_traces)`.
  """

  def __init__(
    self,
    model,
    tokenizer,
    *,
    batch_size: int = 16,
    num_beams: int = 3,
    length_penalty: float = 0.0,
    image_batch_size: int = 32,
    visual_cache_size: int = 4096,
    banned_ids: Sequence[int] = (),
    max_traces: int | None = None,
  ):
    self.model, self.batch_size, self.num_beams = model, int(batch_size), int(num_beams)
    self.length_penalty, self.image_batch_size = float(length_penalty), int(image_batch_size)
    self.pad_id, self.image_id, self.bos_id = tokenizer.pad_id, tokenizer.image_id, tokenizer.bos_id
    # IDEFICS's phi: no image after an end of sequence until the next marker (`xattn.media_reset`).
    self.reset_id = int(tokenizer.eos_id) if model.configs.xattn.media_reset == "eos" else None
    stops = {int(tokenizer.eoc_id), int(tokenizer.eos_id)}
    if not getattr(tokenizer, "add_bos", False):  # BOS is then the document separator
      stops.add(int(tokenizer.bos_id))
    self.banned = tuple(sorted({int(i) for i in banned_ids}))
    self.stop_ids = tuple(sorted(stops - set(self.banned)))
    self._max_traces, self._fns = max_traces, {}
    # (loader, media ref) -> [R, Dr] visual tokens of the params in `_cache_params` (LRU).
    self._cache, self._cache_params = collections.OrderedDict(), None
    self.visual_cache_size = int(visual_cache_size)
    self._cache_axes = kv_cache.CACHE_BATCH_AXES

  def _fn(self, key, build: Callable[[], Callable], jit: bool = True):
    """Builds each function once: the same object keeps hitting jit's cache."""
    if key not in self._fns:
      fn = build()
      if self._max_traces is not None:
        fn = chex.assert_max_traces(fn, n=self._max_traces)
      self._fns[key] = jax.jit(fn) if jit else fn
    return self._fns[key]

  # ---------------------------------------------------------------------------- vision
  def _chunked(
    self, name: str, params, items: Sequence[Hashable], load: Callable[[Hashable], np.ndarray]
  ) -> jax.Array:
    """A vision function over `load(item)` of each item in fixed-size calls (loaded per call)."""
    m = self.model
    fn = self._fn(
      name,
      lambda: {
        "encode": lambda p, x: m.encode_media(p, None, x[:, None])[:, 0],  # [C,F,S,S,3]->[C,R,Dr]
        "features": lambda p, x: m.vision_features(p, None, x),
      }[name],
    )  # [C,S,S,3]->[C,Dv]
    c, outs = self.image_batch_size, []
    for start in range(0, len(items), c):
      part = [load(i) for i in items[start : start + c]]
      chunk = np.zeros((c,) + part[0].shape, np.float32)
      chunk[: len(part)] = part
      outs.append(fn(params, chunk)[: len(part)])
    return jnp.concatenate(outs)

  def encode(self, params, refs: Sequence[Hashable], load) -> jax.Array:
    """Visual tokens [len(refs), R, Dr] of the media `load(ref)` [F,S,S,3]."""
    return self._chunked("encode", params, refs, load)

  def features(self, params, refs: Sequence[Hashable], load) -> np.ndarray:
    """Pooled frozen-vision features [len(refs), Dv] of the images `load(ref)` [S,S,3] (RICES)."""
    return np.asarray(self._chunked("features", params, refs, load))

  def _visual(self, params, refs: Sequence[Sequence[Hashable]], load) -> jax.Array:
    """[len(refs), N, R, Dr] visual tokens; each distinct medium is encoded once, and kept in an
    LRU cache of `visual_cache_size` media for later batches and runs with the same params."""
    if params is not self._cache_params:
      self._cache.clear()
      self._cache_params = params
    slot = {r: i for i, r in enumerate(dict.fromkeys(r for row in refs for r in row))}
    missing = [r for r in slot if (load, r) not in self._cache]
    if missing:
      for r, v in zip(missing, self.encode(params, missing, load)):
        self._cache[load, r] = v
    for r in slot:
      self._cache.move_to_end((load, r))
    encoded = jnp.stack([self._cache[load, r] for r in slot])
    while len(self._cache) > max(self.visual_cache_size, len(slot)):
      self._cache.popitem(last=False)
    return jnp.take(encoded, jnp.asarray([[slot[r] for r in row] for row in refs]), axis=0)

  # ---------------------------------------------------------------------------- decoding
  def _prefill(self, max_new_tokens: int, lm_only: bool):
    m, image_id = self.model, self.image_id

    def prefill(params, tokens, token_mask, visual=None):
      """Prompt [B,T] (left-padded) -> (logits of its last token [B,1,V], cache)."""
      b, t = tokens.shape
      media, per_media = (0, None) if visual is None else visual.shape[1:3]
      cache = m.init_cache(b, t + max_new_tokens, media, m.configs.dtype, tokens_per_media=per_media)
      phi = (
        None
        if visual is None
        else masking.media_index_from_tokens(tokens, image_id, reset_id=self.reset_id)[:, :-1]
      )
      # All but the last token: their logits are never computed (the outputs are unused).
      _, cache = m.prefill(
        params,
        tokens[:, :-1],
        cache,
        visual=visual,
        media_index=phi,
        token_mask=token_mask[:, :-1],
        lm_only=lm_only,
      )
      if visual is not None and cache.xattn_k is not None:
        cache = _last_media_only(cache, per_media)
      logits, cache = m.prefill(params, tokens[:, -1:], cache, token_mask=token_mask[:, -1:], lm_only=lm_only)
      return self._ban(logits), cache

    return prefill

  def _ban(self, logits):
    return logits.at[..., self.banned].set(-jnp.inf) if self.banned else logits

  def _decode_step(self, lm_only: bool):
    m = self.model

    def step(params, tokens, cache):
      logits, cache = m.decode_step(params, tokens, cache, lm_only=lm_only)
      return self._ban(logits), cache

    return step

  def _stops(self, extra_stop_ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(set(self.stop_ids) | {int(i) for i in extra_stop_ids}))

  def _batches(self, prompts: Sequence[Sequence[int]], prompt_len: int):
    """Yields (rows, real, tokens, token_mask): `batch_size` prompt indices (the last batch filled
    with repeats: a full batch keeps the shapes), how many are real, the left-padded prompts."""
    for start in range(0, len(prompts), self.batch_size):
      rows = list(range(start, min(start + self.batch_size, len(prompts))))
      real = len(rows)
      rows += [rows[-1]] * (self.batch_size - real)
      yield (rows, real, *_left_pad([prompts[i] for i in rows], prompt_len, self.pad_id))

  @staticmethod
  def _generated(result, real: int, stops: tuple[int, ...]) -> list[list[int]]:
    """The first `real` rows of a decoding result as id lists, stop ids dropped."""
    ids, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    return [[int(i) for i in ids[r, : lengths[r]] if int(i) not in stops] for r in range(real)]

  def decode_fns(self, max_new_tokens: int, lm_only: bool = False):
    """(prefill(params, tokens, token_mask, visual=None), decode_step(params, tokens, cache)), as
    `eval/decoding.py` takes them; the cache has room for `max_new_tokens`. Built once per key."""
    prefill = self._fn(
      ("prefill", max_new_tokens, lm_only), lambda: self._prefill(max_new_tokens, lm_only), jit=False
    )
    return prefill, self._fn(("step", lm_only), lambda: self._decode_step(lm_only), jit=False)

  def generate(
    self,
    params,
    prompts: Sequence[Sequence[int]],
    media: Sequence[Sequence[Hashable]],
    load: Callable[[Hashable], np.ndarray],
    *,
    prompt_len: int,
    max_new_tokens: int,
    lm_only: bool = False,
    extra_stop_ids: Sequence[int] = (),
  ) -> list[list[int]]:
    """Generated ids (stop token excluded) of each prompt (ids with BOS; media refs per prompt)."""
    prefill, step = self.decode_fns(max_new_tokens, lm_only)
    stops = self._stops(extra_stop_ids)
    kw = dict(max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=self.pad_id)
    out = []
    for rows, real, tokens, mask in self._batches(prompts, prompt_len):
      refs = [media[i] for i in rows]  # no media in the batch: no visual tokens (the blocks still run)
      inputs = None if lm_only or not any(refs) else {"visual": self._visual(params, refs, load)}
      if self.num_beams == 1:
        result = decoding.greedy_decode(prefill, step, params, tokens, mask, prefill_inputs=inputs, **kw)
      else:
        result = decoding.beam_search(
          prefill,
          step,
          params,
          tokens,
          mask,
          prefill_inputs=inputs,
          num_beams=self.num_beams,
          alpha=self.length_penalty,
          cache_batch_axes=self._cache_axes,
          **kw,
        )
      out += self._generated(result, real, stops)
    return out

  # ---------------------------------------------------------------------------- scoring
  def _generate_and_score(self, room: int, max_new_tokens: int, stops: tuple, lm_only: bool):
    m, prefill, step = self.model, self._prefill(room, lm_only), self._decode_step(lm_only)

    def run(params, tokens, token_mask, conts, cont_mask, visual=None):
      """Prompts [B,T] + continuations [B,C,L] (right-padded) -> (greedy DecodeOutput, summed
      log-probs [B,C]), from one prefill: the cache is a value, reused by every branch."""
      first, cache = prefill(params, tokens, token_mask, visual)
      scores = []
      for c in range(conts.shape[1]):
        logits, _ = m.prefill(params, conts[:, c], cache, token_mask=cont_mask[:, c], lm_only=lm_only)
        logits = jnp.concatenate([first, self._ban(logits)[:, :-1]], axis=1).astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), conts[:, c, :, None], axis=-1)
        scores.append(jnp.sum(logp[..., 0] * cont_mask[:, c], axis=-1))
      decoded = decoding.greedy_decode(
        _prefilled,
        step,
        params,
        tokens,
        token_mask,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        pad_id=self.pad_id,
        prefill_inputs={"logits": first, "cache": cache},
      )
      return decoded, jnp.stack(scores, axis=1)

    return run

  def generate_and_score(
    self,
    params,
    prompts: Sequence[Sequence[int]],
    media: Sequence[Sequence[Hashable]],
    continuations: Sequence[Sequence[Sequence[int]]],
    load: Callable[[Hashable], np.ndarray],
    *,
    prompt_len: int,
    max_new_tokens: int,
    lm_only: bool = False,
    extra_stop_ids: Sequence[int] = (),
  ) -> tuple[list[list[int]], np.ndarray]:
    """(greedy generations as in `generate`, summed log-probs [Q, C] of each prompt's C
    continuations) from one prefill per prompt: open- and close-ended answers of the same prompts,
    where the candidates differ per prompt. Every prompt has the same number C of continuations."""
    count = {len(c) for c in continuations}
    if len(count) != 1:
      raise ValueError(f"every prompt needs the same number of continuations, got {sorted(count)}")
    length = max(len(x) for c in continuations for x in c)
    stops = self._stops(extra_stop_ids)
    fn = self._fn(
      ("generate_and_score", length, max_new_tokens, stops, lm_only),
      lambda: self._generate_and_score(max(length, max_new_tokens), max_new_tokens, stops, lm_only),
    )
    c, texts, out = count.pop(), [], []
    for rows, real, tokens, mask in self._batches(prompts, prompt_len):
      conts = np.full([len(rows), c, length], self.pad_id, np.int32)
      cont_mask = np.zeros([len(rows), c, length], bool)
      for r, i in enumerate(rows):
        for j, ids in enumerate(continuations[i]):
          conts[r, j, : len(ids)], cont_mask[r, j, : len(ids)] = ids, True
      visual = None if lm_only else self._visual(params, [media[i] for i in rows], load)
      decoded, scores = fn(params, tokens, mask, conts, cont_mask, visual)
      texts += self._generated(decoded, real, stops)
      out.append(np.asarray(scores)[:real])
    return texts, np.concatenate(out)

  def _score(self, lm_only: bool):
    m, image_id = self.model, self.image_id

    def score(params, tokens, token_mask, target_mask, visual=None):
      def forward(tokens, token_mask, visual=None):
        phi = (
          None
          if visual is None
          else masking.media_index_from_tokens(tokens, image_id, reset_id=self.reset_id)
        )
        return m.lm_forward(params, None, tokens, visual, phi, token_mask, None, lm_only)[0]

      extra = {} if visual is None else {"visual": visual}
      return scoring.make_logprob_fn(forward)(tokens, token_mask, target_mask, **extra)

    return score

  def rank(
    self,
    params,
    prompts: Sequence[Sequence[Sequence[int]]],
    media: Sequence[Sequence[Sequence[Hashable]]],
    candidates: Sequence[Sequence[int]],
    load: Callable[[Hashable], np.ndarray],
    *,
    prompt_len: int,
    lm_only: bool = False,
  ) -> scoring.RankingResult:
    """`scoring.rank_candidates` of the same candidates for every query; prompts[q][p] (ids) with
    media[q][p]; queries are processed `batch_size` at a time (their visual tokens held on host)."""
    fn = self._fn(("score", lm_only), lambda: self._score(lm_only))
    logprob = functools.partial(fn, params)
    cand_len = max(len(c) for c in candidates)
    parts = []
    for start in range(0, len(prompts), self.batch_size):
      q_range = range(start, min(start + self.batch_size, len(prompts)))
      row_inputs = None
      if not lm_only:
        flat = [media[q][p] for q in q_range for p in range(len(media[q]))]
        visual = np.asarray(self._visual(params, flat, load))
        it = iter(visual)
        row_inputs = [[{"visual": next(it)} for _ in media[q]] for q in q_range]
      parts.append(
        scoring.rank_candidates(
          logprob,
          [prompts[q] for q in q_range],
          [list(candidates)] * len(q_range),
          prompt_len=prompt_len,
          candidate_len=cand_len,
          pad_id=self.pad_id,
          batch_size=self.batch_size,
          row_inputs=row_inputs,
        )
      )
    return scoring.RankingResult(*(np.concatenate(x) for x in zip(*parts)))
