"""Close-ended scoring: rank candidate answers by their log-likelihood after the prompt.

Shapes: Nq queries, P prompts per query (prompt ensembling: permutations of the support examples),
C candidates per query, Lp prompt tokens (left-padded), Lc candidate tokens (right-padded),
T = Lp + Lc row length, R rows per call of the scoring function, V vocabulary.

Scoring-function contract (built by the caller on the model, jitted once; rows have fixed shapes):
  logprob_fn(tokens [R,T] int32, token_mask [R,T] bool, target_mask [R,T] bool, **row_inputs) -> [R]
returns, per row, the summed log-probability of the tokens where target_mask is True, each predicted
from the tokens before it (`make_logprob_fn` builds one from a forward function). Rows read
[pad.. prompt | candidate ..pad]; padding rows that fill the last call have all-False masks.

A candidate's score is its log-likelihood (optionally divided by its token count), averaged over the
P prompts of its query; the prediction is the argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.eval import prompting

LogprobFn = Callable[..., Any]  # (tokens, token_mask, target_mask, **row_inputs) -> [R]


def sequence_logprob(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed fp32 log-prob [B] of `targets` [B,T] under `logits` [B,T,V] where `mask` [B,T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1)


def make_logprob_fn(forward_fn: Callable[..., jax.Array]) -> LogprobFn:
  """A `logprob_fn` from `forward_fn(tokens [R,T], token_mask [R,T], **row_inputs)`, which returns
  logits [R,T,V] where logits[:, t] predict tokens[:, t + 1]."""

  def logprob_fn(tokens, token_mask, target_mask, **row_inputs):
    logits = forward_fn(tokens, token_mask, **row_inputs)
    return sequence_logprob(logits[:, :-1], tokens[:, 1:], target_mask[:, 1:])

  return logprob_fn


class RankingResult(NamedTuple):
  best: np.ndarray  # [Nq] int: index of the highest-scoring candidate
  scores: np.ndarray  # [Nq, C] float: mean over prompts (-inf for missing candidates)
  prompt_scores: np.ndarray  # [Nq, P, C] float: per prompt


def _rows(prompts, candidates) -> Iterator[tuple[int, int, int]]:
  for q, query_prompts in enumerate(prompts):
    for p in range(len(query_prompts)):
      for c in range(len(candidates[q])):
        yield q, p, c


def rank_candidates(
  logprob_fn: LogprobFn,
  prompts: Sequence[Sequence[Sequence[int]]],
  candidates: Sequence[Sequence[Sequence[int]]],
  *,
  prompt_len: int,
  candidate_len: int,
  pad_id: int,
  batch_size: int,
  row_inputs: Sequence[Sequence[Mapping[str, Any]]] | None = None,
  length_normalize: bool = False,
) -> RankingResult:
  """Ranks each query's candidates by log-likelihood, averaged over its prompts.

  Args:
    logprob_fn: see the module docstring.
    prompts: prompts[q][p]: token ids of the p-th prompt of query q (BOS included); every query
      has the same number P of prompts.
    candidates: candidates[q][c]: token ids of candidate c of query q (e.g. " {label}<EOC>"); the
      number per query may vary (missing ones score -inf).
    prompt_len, candidate_len: Lp and Lc; longer prompts or candidates raise.
    pad_id: fills padding positions.
    batch_size: R, rows per logprob_fn call (the last call is padded).
    row_inputs: row_inputs[q][p]: dict of arrays without batch axis (e.g. images [N,F,H,W,3])
      for the rows of prompt p of query q, stacked on a new leading axis and passed as keywords.
    length_normalize: divide each candidate's log-likelihood by its token count.

  Long: batching, scoring and prompt-ensemble averaging of one ranking pass.
  """
  num_queries = len(prompts)
  if len(candidates) != num_queries:
    raise ValueError(f"{len(candidates)} candidate lists for {num_queries} queries")
  num_prompts = {len(p) for p in prompts}
  if len(num_prompts) != 1 or 0 in num_prompts:
    raise ValueError(f"Every query needs the same number (>= 1) of prompts, got {sorted(num_prompts)}")
  num_prompts = num_prompts.pop()
  if row_inputs is not None and [len(r) for r in row_inputs] != [num_prompts] * num_queries:
    raise ValueError("row_inputs must hold one dict per prompt of every query")
  for q in range(num_queries):
    for p, ids in enumerate(prompts[q]):
      if not 0 < len(ids) <= prompt_len:
        raise ValueError(f"Prompt {p} of query {q} has {len(ids)} tokens; prompt_len={prompt_len}")
    if not candidates[q]:
      raise ValueError(f"Query {q} has no candidates")
    for c, ids in enumerate(candidates[q]):
      if not 0 < len(ids) <= candidate_len:
        raise ValueError(f"Candidate {c} of query {q} has {len(ids)} tokens; candidate_len={candidate_len}")

  max_cands = max(len(c) for c in candidates)
  prompt_scores = np.full([num_queries, num_prompts, max_cands], -np.inf)
  seq_len = prompt_len + candidate_len
  template = None if row_inputs is None else {k: np.asarray(v) for k, v in row_inputs[0][0].items()}

  def run(batch_rows):
    tokens = np.full([batch_size, seq_len], pad_id, np.int32)
    token_mask = np.zeros([batch_size, seq_len], bool)
    target_mask = np.zeros([batch_size, seq_len], bool)
    extras = (
      None
      if template is None
      else {k: np.zeros((batch_size,) + v.shape, v.dtype) for k, v in template.items()}
    )
    for r, (q, p, c) in enumerate(batch_rows):
      prompt, cand = prompts[q][p], candidates[q][c]
      start = prompt_len - len(prompt)
      tokens[r, start:prompt_len] = prompt
      tokens[r, prompt_len : prompt_len + len(cand)] = cand
      token_mask[r, start : prompt_len + len(cand)] = True
      target_mask[r, prompt_len : prompt_len + len(cand)] = True
      if extras is not None:
        for k in extras:
          extras[k][r] = row_inputs[q][p][k]
    values = np.asarray(logprob_fn(tokens, token_mask, target_mask, **(extras or {})), np.float64)
    if values.shape != (batch_size,):
      raise ValueError(f"logprob_fn returned shape {values.shape}, expected ({batch_size},)")
    for r, (q, p, c) in enumerate(batch_rows):
      norm = len(candidates[q][c]) if length_normalize else 1
      prompt_scores[q, p, c] = values[r] / norm

  pending = []
  for row in _rows(prompts, candidates):
    pending.append(row)
    if len(pending) == batch_size:
      run(pending)
      pending = []
  if pending:
    run(pending)

  scores = prompt_scores.mean(axis=1)
  return RankingResult(best=np.argmax(scores, axis=-1), scores=scores, prompt_scores=prompt_scores)


def rank_text_candidates(
  logprob_fn: LogprobFn,
  encode: Callable[[str], list[int]],
  prompt_texts: Sequence[Sequence[str]],
  candidate_texts: Sequence[Sequence[str]],
  *,
  bos_id: int | None,
  **kwargs,
) -> RankingResult:
  """`rank_candidates` on texts: prompts get `bos_id` prepended (None: none), candidates are encoded
  as the continuation " {candidate}<EOC>" (prompt and continuation are encoded separately)."""
  bos = [] if bos_id is None else [bos_id]
  prompts = [[bos + list(encode(t)) for t in texts] for texts in prompt_texts]
  cache: dict[str, list[int]] = {}
  candidates = []
  for texts in candidate_texts:
    for t in texts:
      if t not in cache:
        cache[t] = list(encode(prompting.continuation(t)))
    candidates.append([cache[t] for t in texts])
  return rank_candidates(logprob_fn, prompts, candidates, **kwargs)
