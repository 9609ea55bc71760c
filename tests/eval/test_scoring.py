"""Tests for flamingo_jax.eval.scoring with a toy bigram language model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.eval import scoring

V = 7
PAD = 0


def _table(seed=0):
  logits = np.random.default_rng(seed).normal(size=[V, V]).astype(np.float32)
  return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))


TABLE = _table()


def _bigram_forward(tokens, token_mask, bias=None):
  """logits[:, t] predict tokens[:, t + 1]; `bias` [R, V] is a per-row input (like images)."""
  del token_mask
  logits = jnp.asarray(TABLE)[tokens]
  if bias is not None:
    logits = logits + bias[:, None, :]
  return logits


def _direct_logprob(prompt, cand, bias=None):
  table = TABLE if bias is None else np.asarray(jax.nn.log_softmax(TABLE + bias, axis=-1))
  seq = list(prompt) + list(cand)
  return sum(float(table[seq[i - 1], seq[i]]) for i in range(len(prompt), len(seq)))


def test_sequence_logprob_fp32_and_masked():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=[2, 4, V]), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, V, size=[2, 4]), jnp.int32)
  mask = jnp.array([[True, True, False, False], [False, True, True, True]])
  out = scoring.sequence_logprob(logits, targets, mask)
  assert out.dtype == jnp.float32 and out.shape == (2,)
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
  expected = [sum(logp[b, t, int(targets[b, t])] for t in range(4) if mask[b, t]) for b in range(2)]
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  # -inf log-probs outside the mask do not poison the sum.
  masked = logits.at[0, 3].set(-jnp.inf)
  assert np.isfinite(scoring.sequence_logprob(masked, targets, mask)[0])


def test_rank_matches_direct_scores_and_batching():
  logprob_fn = jax.jit(chex.assert_max_traces(scoring.make_logprob_fn(_bigram_forward), n=1))
  prompts = [[[1, 2, 3]], [[2, 5]], [[4, 4, 1, 6]]]
  candidates = [[[3, 1], [2], [5, 5, 6]], [[1], [6, 2]], [[2, 2], [3], [4, 1], [6]]]
  result = scoring.rank_candidates(
    logprob_fn, prompts, candidates, prompt_len=5, candidate_len=3, pad_id=PAD, batch_size=4
  )
  assert result.scores.shape == (3, 4) and result.prompt_scores.shape == (3, 1, 4)
  for q in range(3):
    direct = [_direct_logprob(prompts[q][0], c) for c in candidates[q]]
    np.testing.assert_allclose(result.scores[q, : len(direct)], direct, rtol=1e-5)
    assert np.all(result.scores[q, len(direct) :] == -np.inf)
    assert result.best[q] == int(np.argmax(direct))
  # Same answer for another batch size (rows padded differently); fixed shapes: one trace above.
  other = scoring.rank_candidates(
    jax.jit(scoring.make_logprob_fn(_bigram_forward)),
    prompts,
    candidates,
    prompt_len=5,
    candidate_len=3,
    pad_id=PAD,
    batch_size=3,
  )
  np.testing.assert_allclose(other.scores, result.scores, rtol=1e-6)


def test_length_normalisation():
  prompts = [[[1, 2]]]
  candidates = [[[3], [3, 4, 5]]]
  result = scoring.rank_candidates(
    jax.jit(scoring.make_logprob_fn(_bigram_forward)),
    prompts,
    candidates,
    prompt_len=2,
    candidate_len=3,
    pad_id=PAD,
    batch_size=2,
    length_normalize=True,
  )
  expected = [_direct_logprob([1, 2], [3]), _direct_logprob([1, 2], [3, 4, 5]) / 3]
  np.testing.assert_allclose(result.scores[0], expected, rtol=1e-5)


def test_prompt_ensembling_averages_over_permutations():
  # Two queries, three prompts each (e.g. support permutations), per-prompt row inputs.
  prompts = [[[1, 2, 3], [2, 1, 3], [3, 2, 1]], [[5, 6], [6, 5], [5, 5]]]
  candidates = [[[4], [5, 6]], [[1], [2], [3]]]
  rng = np.random.default_rng(2)
  row_inputs = [[{"bias": rng.normal(size=[V]).astype(np.float32)} for _ in range(3)] for _ in range(2)]
  result = scoring.rank_candidates(
    jax.jit(scoring.make_logprob_fn(_bigram_forward)),
    prompts,
    candidates,
    prompt_len=3,
    candidate_len=2,
    pad_id=PAD,
    batch_size=4,
    row_inputs=row_inputs,
  )
  for q in range(2):
    per_prompt = np.array(
      [[_direct_logprob(prompts[q][p], c, row_inputs[q][p]["bias"]) for c in candidates[q]] for p in range(3)]
    )
    np.testing.assert_allclose(result.prompt_scores[q, :, : len(candidates[q])], per_prompt, rtol=1e-5)
    np.testing.assert_allclose(result.scores[q, : len(candidates[q])], per_prompt.mean(0), rtol=1e-5)
    assert result.best[q] == int(np.argmax(per_prompt.mean(0)))


def test_masks_passed_to_logprob_fn():
  seen = []

  def logprob_fn(tokens, token_mask, target_mask):
    seen.append((tokens, token_mask, target_mask))
    return np.zeros([tokens.shape[0]])

  scoring.rank_candidates(
    logprob_fn, [[[7, 8]]], [[[9]]], prompt_len=3, candidate_len=2, pad_id=PAD, batch_size=2
  )
  tokens, token_mask, target_mask = seen[0]
  np.testing.assert_array_equal(tokens, [[PAD, 7, 8, 9, PAD], [PAD] * 5])
  np.testing.assert_array_equal(token_mask, [[False, True, True, True, False], [False] * 5])
  np.testing.assert_array_equal(target_mask, [[False, False, False, True, False], [False] * 5])


def test_text_wrapper_encodes_continuation():
  vocab = {"<s>": 1, "Q": 2, " yes<EOC>": 3, " no<EOC>": 4}
  seen = []

  def logprob_fn(tokens, token_mask, target_mask):
    seen.append(np.asarray(tokens))
    return np.where(tokens[:, -1] == 3, -1.0, -2.0)

  result = scoring.rank_text_candidates(
    logprob_fn,
    lambda text: [vocab[text]],
    [["Q"]],
    [["no", "yes"]],
    bos_id=1,
    prompt_len=2,
    candidate_len=1,
    pad_id=PAD,
    batch_size=2,
  )
  np.testing.assert_array_equal(seen[0], [[1, 2, 4], [1, 2, 3]])
  assert result.best[0] == 1


def test_bad_inputs_raise():
  fn = lambda t, m, g: np.zeros([t.shape[0]])  # noqa: E731
  with pytest.raises(ValueError, match="Prompt 0 of query 0 has 4 tokens"):
    scoring.rank_candidates(
      fn, [[[1, 2, 3, 4]]], [[[1]]], prompt_len=3, candidate_len=2, pad_id=PAD, batch_size=2
    )
  with pytest.raises(ValueError, match="Candidate 1 of query 0"):
    scoring.rank_candidates(
      fn, [[[1]]], [[[1], [1, 2, 3]]], prompt_len=3, candidate_len=2, pad_id=PAD, batch_size=2
    )
  with pytest.raises(ValueError, match="same number"):
    scoring.rank_candidates(
      fn, [[[1]], [[1], [2]]], [[[1]], [[1]]], prompt_len=3, candidate_len=2, pad_id=PAD, batch_size=2
    )
