"""Tests for flamingo_jax.eval.decoding with a toy pure-JAX trigram "model".

The model's next-token log-probs depend on the last two tokens: the previous one lives in the cache,
so a wrong beam reordering of the cache changes the results.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.eval import decoding

V = 5
PAD, STOP, EOS = 0, 1, 4
CACHE_AXES = {"prev": 0, "index": None}
# Shared static settings, so that tests reuse compilations (the toy model compiles slowly on CPU).
N = 6
KW = dict(max_new_tokens=N, stop_ids=(STOP, EOS), pad_id=PAD)


def prefill(params, tokens, token_mask):
  del token_mask  # Left padding: the last position is always valid.
  prev = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  logits = params[prev, tokens]  # [B, T, V]
  return logits, {"prev": tokens[:, -1], "index": jnp.int32(tokens.shape[1])}


def decode_step(params, tokens, cache):
  logits = params[cache["prev"], tokens[:, 0]][:, None]  # [B, 1, V]
  return logits, {"prev": tokens[:, 0], "index": cache["index"] + 1}


def _random_table(seed, vocab=V):
  logits = 2.0 * np.random.default_rng(seed).normal(size=[vocab, vocab, vocab])
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _prompts(last=None):
  """Left-padded prompts [3, 4]; `last` replaces the last token of each row."""
  tokens = np.array([[0, 0, 2, 3], [0, 3, 3, 2], [2, 3, 2, 2]], np.int32)
  if last is not None:
    tokens[:, -1] = last
  return jnp.asarray(tokens), jnp.asarray(tokens != 0).at[:, -1].set(True)


def _seq_logp(table, prompt, seq):
  """Teacher-forced log-prob of `seq` after `prompt` under the trigram table."""
  table, prompt = np.asarray(table), np.asarray(prompt)
  prev, cur, total = int(prompt[-2]), int(prompt[-1]), 0.0
  for tok in seq:
    total += float(table[prev, cur, tok])
    prev, cur = cur, tok
  return total


def _numpy_greedy(table, prompt, n, stop_ids):
  prev, cur, out = int(prompt[-2]), int(prompt[-1]), []
  for _ in range(n):
    tok = int(np.argmax(table[prev, cur]))
    out.append(tok)
    if tok in stop_ids:
      break
    prev, cur = cur, tok
  return out


def _lp(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_numpy_loop(seed):
  table = _random_table(seed)
  tokens, mask = _prompts()
  out = decoding.greedy_decode(prefill, decode_step, table, tokens, mask, **KW)
  for b in range(tokens.shape[0]):
    expected = _numpy_greedy(np.asarray(table), np.asarray(tokens[b]), N, (STOP, EOS))
    got = np.asarray(out.tokens[b])
    np.testing.assert_array_equal(got[: len(expected)], expected)
    assert np.all(got[len(expected) :] == PAD)
    assert int(out.lengths[b]) == len(expected)
    assert float(out.scores[b]) == pytest.approx(_seq_logp(table, tokens[b], expected), abs=1e-5)


def _peaked_table():
  """Next-token probabilities depending on the current token only (prev ignored)."""
  probs = np.full([V, V], 1e-3)
  probs[PAD] = [1e-3, 1e-3, 0.55, 0.45, 1e-3]  # after the prompt: A (2) beats B (3)
  probs[2] = [1e-3, 0.3, 0.35, 0.34, 1e-3]  # after A: no confident stop
  probs[3] = [1e-3, 0.99, 1e-3, 1e-3, 1e-3]  # after B: stop
  probs /= probs.sum(-1, keepdims=True)
  return jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), [V, V, V]))


def test_beam_finds_sequence_greedy_misses():
  table = _peaked_table()
  tokens, mask = _prompts(last=PAD)
  greedy = decoding.greedy_decode(prefill, decode_step, table, tokens, mask, **KW)
  np.testing.assert_array_equal(greedy.tokens[0], [2] * N)  # never stops
  beam = decoding.beam_search(
    prefill, decode_step, table, tokens, mask, num_beams=3, alpha=0.0, cache_batch_axes=CACHE_AXES, **KW
  )
  np.testing.assert_array_equal(beam.tokens, [[3, STOP] + [PAD] * (N - 2)] * 3)
  np.testing.assert_array_equal(beam.lengths, [2, 2, 2])
  assert float(beam.scores[0]) == pytest.approx(_seq_logp(table, tokens[0], [3, STOP]), abs=1e-5)
  assert float(beam.scores[0]) > float(greedy.scores[0])


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_beam_one_equals_greedy(seed):
  table = _random_table(seed)
  tokens, mask = _prompts()
  greedy = decoding.greedy_decode(prefill, decode_step, table, tokens, mask, **KW)
  beam = decoding.beam_search(
    prefill, decode_step, table, tokens, mask, num_beams=1, alpha=0.0, cache_batch_axes=CACHE_AXES, **KW
  )
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-5)


def _brute_force(table, prompt, n, alpha):
  """All finished sequences (non-stop tokens then STOP, length <= n), best score first."""
  scored = []
  for length in range(1, n + 1):
    for body in itertools.product([t for t in range(V) if t != STOP], repeat=length - 1):
      seq = list(body) + [STOP]
      scored.append((_seq_logp(table, prompt, seq) / _lp(length, alpha), seq))
  return sorted(scored, key=lambda x: -x[0])


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_is_exact(alpha):
  # With K >= every candidate of every step (V**(n-1) * V = 125 for n = 3), the search is
  # exhaustive.
  table = _random_table(7)
  tokens, mask = _prompts()
  k, n = 125, 3
  beam = decoding.beam_search(
    prefill,
    decode_step,
    table,
    tokens,
    mask,
    max_new_tokens=n,
    stop_ids=STOP,
    pad_id=PAD,
    num_beams=k,
    alpha=alpha,
    cache_batch_axes=CACHE_AXES,
  )
  for b in range(tokens.shape[0]):
    best = _brute_force(np.asarray(table), np.asarray(tokens[b]), n, alpha)
    assert float(beam.scores[b]) == pytest.approx(best[0][0], abs=1e-5)
    got = list(np.asarray(beam.tokens[b])[: int(beam.lengths[b])])
    assert got == best[0][1]
    # The finished pool holds the K best finished sequences, in order (ties aside).
    top = [s for s, _ in best[:k]]
    np.testing.assert_allclose(np.asarray(beam.beam_scores[b])[: len(top)], top, atol=1e-5)


def test_beam_scores_match_teacher_forcing():
  # Every returned hypothesis must score what the model gives it when re-scored from scratch: a
  # cache not reordered with its beam would break this.
  table = _random_table(11)
  tokens, mask = _prompts()
  alpha = 0.6
  beam = decoding.beam_search(
    prefill, decode_step, table, tokens, mask, num_beams=3, alpha=alpha, cache_batch_axes=CACHE_AXES, **KW
  )
  for b in range(tokens.shape[0]):
    for j in range(3):
      score = float(beam.beam_scores[b, j])
      if not np.isfinite(score):
        continue
      seq = [int(t) for t in beam.beam_tokens[b, j]]
      length = next((i + 1 for i, t in enumerate(seq) if t in (STOP, EOS)), len(seq))
      assert all(t == PAD for t in seq[length:])
      expected = _seq_logp(table, tokens[b], seq[:length]) / _lp(length, alpha)
      assert score == pytest.approx(expected, abs=1e-4)
    assert np.all(np.diff(np.asarray(beam.beam_scores[b])) <= 1e-6)  # best first


def test_stop_and_padding_per_row():
  # Row 0 stops at once (after B), row 1 goes B then stop; then only pads.
  table = _peaked_table()
  probs = np.exp(np.asarray(table[0]))
  probs[2] = [1e-3, 1e-3, 1e-3, 0.99, 1e-3]  # after A: B
  table = jnp.log(jnp.broadcast_to(jnp.asarray(probs / probs.sum(-1, keepdims=True)), [V, V, V]))
  tokens, mask = _prompts(last=jnp.array([3, 2, 3]))
  out = decoding.greedy_decode(prefill, decode_step, table, tokens, mask, **KW)
  pads = [PAD] * (N - 2)
  np.testing.assert_array_equal(out.tokens, [[STOP, PAD] + pads, [3, STOP] + pads, [STOP, PAD] + pads])
  np.testing.assert_array_equal(out.lengths, [1, 2, 1])
  beam = decoding.beam_search(
    prefill, decode_step, table, tokens, mask, num_beams=3, alpha=0.0, cache_batch_axes=CACHE_AXES, **KW
  )
  np.testing.assert_array_equal(beam.tokens, out.tokens)


def test_no_retrace_on_same_shapes():
  counted_decode = chex.assert_max_traces(decode_step, n=2)  # one greedy + one beam trace
  counted_prefill = chex.assert_max_traces(prefill, n=2)
  tokens, mask = _prompts()
  for seed in range(3):
    table = _random_table(seed)
    # Fresh but equal arguments: a list of stop ids, a new axes dict, another alpha.
    decoding.greedy_decode(
      counted_prefill,
      counted_decode,
      table,
      tokens + 0,
      mask,
      max_new_tokens=N,
      stop_ids=[STOP, EOS],
      pad_id=PAD,
    )
    decoding.beam_search(
      counted_prefill,
      counted_decode,
      table,
      tokens,
      mask,
      num_beams=2,
      alpha=0.1 * seed,
      cache_batch_axes=dict(CACHE_AXES),
      **KW,
    )


def test_bad_arguments_raise():
  tokens, mask = _prompts()
  table = _random_table(0)
  with pytest.raises(TypeError, match="cache_batch_axes"):
    decoding.beam_search(prefill, decode_step, table, tokens, mask, **KW)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.greedy_decode(
      prefill, decode_step, table, tokens, mask, max_new_tokens=0, stop_ids=STOP, pad_id=PAD
    )
  with pytest.raises(ValueError, match="structure"):
    decoding.beam_search(
      prefill, decode_step, table, tokens, mask, num_beams=4, cache_batch_axes={"prev": 0}, **KW
    )
