"""Tests for flamingo_jax.eval.rices."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.eval import rices


def _features(num, dim, seed):
  x = np.random.default_rng(seed).normal(size=[num, dim]).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_top_k_most_similar_last():
  support = _features(20, 8, 0)
  queries = _features(5, 8, 1)
  idx = rices.top_k_similar(support, jnp.asarray(queries), 4)
  assert idx.shape == (5, 4)
  sims = queries @ support.T
  for q in range(5):
    expected = np.argsort(sims[q])[-4:]  # ascending: most similar last
    np.testing.assert_array_equal(idx[q], expected)


def test_query_itself_is_never_returned():
  support = _features(10, 4, 2)
  ids = np.arange(100, 110)
  idx = rices.top_k_similar(support, support[:6], 3, support_ids=ids, exclude_ids=ids[:6].tolist())
  for q in range(6):
    assert q not in idx[q]
    sims = support[q] @ support.T
    sims[q] = -np.inf
    np.testing.assert_array_equal(idx[q], np.argsort(sims)[-3:])


def test_k_too_large_and_bad_shapes_raise():
  support = _features(4, 4, 3)
  with pytest.raises(ValueError, match="k=4"):
    rices.top_k_similar(support, support[:1], 4, support_ids=[0, 1, 2, 3], exclude_ids=[0])
  with pytest.raises(ValueError, match="widths differ"):
    rices.top_k_similar(support, _features(1, 3, 0), 1)


def test_cache_written_once_and_reused(tmp_path):
  support = _features(12, 6, 4)
  calls = []

  def feature_fn():
    calls.append(1)
    return np.arange(12), jnp.asarray(support * 3.0)  # not normalised: RICES normalises

  kwargs = dict(model_id=1000, dataset="easy_vqa", split="train", count=12)
  first = rices.RICES(feature_fn, str(tmp_path), **kwargs)
  queries = _features(3, 6, 5)
  sel1 = first.select(queries, 2)
  assert len(calls) == 1
  assert os.path.exists(first.cache_path)
  assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
  with np.load(first.cache_path, allow_pickle=False) as data:
    np.testing.assert_allclose(data["features"], support, atol=1e-6)

  second = rices.RICES(feature_fn, str(tmp_path), **kwargs)
  sel2 = second.select(queries, 2, exclude_ids=[None, 0, 5])
  assert len(calls) == 1  # read from disk, feature_fn not called again
  np.testing.assert_array_equal(sel1[0], sel2[0])

  other = rices.RICES(feature_fn, str(tmp_path), **{**kwargs, "model_id": 2000})
  assert other.cache_path != first.cache_path
  other.support()
  assert len(calls) == 2


def test_string_ids_and_count_check(tmp_path):
  support = _features(3, 2, 6)
  ok = rices.RICES(
    lambda: (np.array(["a", "b", "c"]), support),
    str(tmp_path / "c"),
    model_id="ckpt",
    dataset="d",
    split="s",
    count=3,
  )
  idx = ok.select(support, 2, exclude_ids=["a", "b", "c"])
  assert [0 not in idx[0], 1 not in idx[1], 2 not in idx[2]] == [True] * 3
  bad = rices.RICES(
    lambda: (np.arange(3), support), str(tmp_path / "d"), model_id=0, dataset="d", split="s", count=4
  )
  with pytest.raises(ValueError, match="count=4"):
    bad.support()
  objs = rices.RICES(
    lambda: (np.array([object()] * 3), support),
    str(tmp_path / "e"),
    model_id=0,
    dataset="d",
    split="s",
    count=3,
  )
  with pytest.raises(TypeError, match="ints or strings"):
    objs.support()
