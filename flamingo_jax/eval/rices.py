"""Retrieval-based In-Context Example Selection (RICES, Yang et al. 2021; Flamingo App. B.1.5).

For each query, the support examples whose frozen vision features (pooled, L2-normalised) are most
similar (cosine) to the query's are used as its in-context examples, the most similar placed LAST
(closest to the query in the prompt).

Shapes: Ns support examples, Nq queries, D feature width, k examples per query.

Support features are computed once by a caller-given `feature_fn` and cached as `.npz`
(allow_pickle=False) under `cache_dir`, keyed by a fingerprint of (model checkpoint id/step,
dataset, split, count); the file is written atomically (temporary file + rename) and reused by
later calls. In multi-host runs every host computes the same features, so a race between writers
only costs time, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

FeatureFn = Callable[[], tuple[Any, Any]]  # () -> (ids [Ns], features [Ns, D])
_FORMAT_VERSION = 1


def l2_normalize(x: Any, eps: float = 1e-12) -> np.ndarray:
  """[N, D] rows scaled to unit L2 norm (all-zero rows stay zero), as float32 numpy."""
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"Features must be [N, D], got shape {x.shape}")
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def top_k_similar(
  support_feats: Any,
  query_feats: Any,
  k: int,
  *,
  support_ids: Sequence[Hashable] | None = None,
  exclude_ids: Sequence[Hashable | None] | None = None,
  chunk_size: int = 1024,
) -> np.ndarray:
  """Indices [Nq, k] of each query's k most similar support rows, the MOST similar LAST.

  Args:
    support_feats: [Ns, D] (numpy or jax); re-normalised here.
    query_feats: [Nq, D].
    k: number of examples per query.
    support_ids: [Ns] ids of the support rows; needed with `exclude_ids`.
    exclude_ids: [Nq] for each query an id whose support rows must never be returned (the
      query's own id when queries and support overlap), or None.
    chunk_size: queries per similarity matmul (bounds memory to chunk_size x Ns floats).

  Long: the chunked, multi-host nearest-neighbour search in one place.
  """
  support = l2_normalize(support_feats)
  queries = l2_normalize(query_feats)
  num_support, num_queries = support.shape[0], queries.shape[0]
  if support.shape[1] != queries.shape[1]:
    raise ValueError(
      f"Support features are {support.shape} but query features are {queries.shape}: feature widths differ"
    )
  if exclude_ids is not None:
    if support_ids is None:
      raise ValueError("exclude_ids needs support_ids")
    if len(exclude_ids) != num_queries:
      raise ValueError(f"exclude_ids has {len(exclude_ids)} entries for {num_queries} queries")
  if support_ids is not None and len(support_ids) != num_support:
    raise ValueError(f"support_ids has {len(support_ids)} entries for {num_support} support rows")
  max_excluded = 0
  rows_of_id: dict[Hashable, list[int]] = {}
  if exclude_ids is not None:
    for row, sid in enumerate(np.asarray(support_ids).tolist()):
      rows_of_id.setdefault(sid, []).append(row)
    max_excluded = max((len(rows_of_id.get(e, ())) for e in np.asarray(exclude_ids).tolist()), default=0)
  if not 0 < k <= num_support - max_excluded:
    raise ValueError(
      f"k={k} must be in [1, {num_support - max_excluded}] ({num_support} support "
      f"examples, up to {max_excluded} excluded per query)"
    )

  out = np.empty([num_queries, k], dtype=np.int64)
  exclude_list = None if exclude_ids is None else np.asarray(exclude_ids).tolist()
  for start in range(0, num_queries, chunk_size):
    sims = queries[start : start + chunk_size] @ support.T  # [c, Ns]
    if exclude_list is not None:
      for j in range(sims.shape[0]):
        rows = rows_of_id.get(exclude_list[start + j])
        if rows:
          sims[j, rows] = -np.inf
    if k < num_support:
      top = np.argpartition(-sims, k - 1, axis=-1)[:, :k]
    else:
      top = np.broadcast_to(np.arange(num_support), sims.shape).copy()
    top_sims = np.take_along_axis(sims, top, axis=-1)
    # Ascending similarity (most similar last); ties: the lower support index goes later.
    order = np.lexsort((-top, top_sims), axis=-1)
    out[start : start + sims.shape[0]] = np.take_along_axis(top, order, axis=-1)
  return out


def fingerprint(*, model_id: str | int, dataset: str, split: str, count: int) -> str:
  """A short stable hash of what determines the support features."""
  key = json.dumps(
    {
      "model_id": str(model_id),
      "dataset": dataset,
      "split": split,
      "count": int(count),
      "version": _FORMAT_VERSION,
    },
    sort_keys=True,
  )
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def _atomic_savez(path: str, **arrays: np.ndarray) -> None:
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class RICES:
  """Support-set features (cached on disk) and per-query selection of in-context examples.

  Args:
    feature_fn: `() -> (ids [Ns], features [Ns, D])`: the support set's ids (ints or strings) and
      pooled vision features; called at most once per fingerprint and cache_dir.
    cache_dir: where the `.npz` cache lives (created if missing).
    model_id: checkpoint id or step of the vision encoder that made the features.
    dataset, split, count: which support set (count = its number of examples).
  """

  def __init__(
    self, feature_fn: FeatureFn, cache_dir: str, *, model_id: str | int, dataset: str, split: str, count: int
  ):
    self._feature_fn = feature_fn
    self._cache_dir = cache_dir
    self._count = int(count)
    self._key = fingerprint(model_id=model_id, dataset=dataset, split=split, count=count)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}_{split}_{count}")
    self.cache_path = os.path.join(cache_dir, f"rices_{safe}_{self._key}.npz")
    self._ids: np.ndarray | None = None
    self._features: np.ndarray | None = None

  def _load(self) -> tuple[np.ndarray, np.ndarray]:
    with np.load(self.cache_path, allow_pickle=False) as data:
      missing = {"ids", "features", "fingerprint"} - set(data.files)
      if missing:
        raise KeyError(f"RICES cache {self.cache_path} lacks the arrays {sorted(missing)}")
      if str(data["fingerprint"]) != self._key:
        raise ValueError(
          f"RICES cache {self.cache_path} has fingerprint "
          f"{str(data['fingerprint'])!r}, expected {self._key!r}; delete the file"
        )
      return data["ids"], data["features"]

  def _compute(self) -> tuple[np.ndarray, np.ndarray]:
    ids, features = self._feature_fn()
    ids = np.asarray(ids)
    features = l2_normalize(features)
    if ids.dtype == object:
      raise TypeError(
        "RICES feature_fn must return ids as ints or strings (npz is written without "
        f"pickle), got an object array starting with {ids[:3].tolist()}"
      )
    if ids.shape != (features.shape[0],):
      raise ValueError(
        f"RICES feature_fn returned ids of shape {ids.shape} for features of shape {features.shape}"
      )
    if features.shape[0] != self._count:
      raise ValueError(f"RICES feature_fn returned {features.shape[0]} features but count={self._count}")
    os.makedirs(self._cache_dir, exist_ok=True)
    _atomic_savez(self.cache_path, ids=ids, features=features, fingerprint=np.array(self._key))
    return ids, features

  def support(self) -> tuple[np.ndarray, np.ndarray]:
    """(ids [Ns], L2-normalised features [Ns, D] float32) from memory, the cache or feature_fn."""
    if self._features is None:
      if os.path.exists(self.cache_path):
        self._ids, self._features = self._load()
      else:
        self._ids, self._features = self._compute()
    return self._ids, self._features

  def select(
    self, query_feats: Any, k: int, exclude_ids: Sequence[Hashable | None] | None = None
  ) -> np.ndarray:
    """Support indices [Nq, k] for each query, most similar LAST.

    `exclude_ids[q]` (e.g. the query's own id when queries come from the support split) is never
    returned for query q.
    """
    ids, features = self.support()
    return top_k_similar(features, query_feats, k, support_ids=ids, exclude_ids=exclude_ids)
