"""Host batches -> global `jax.Array`s on a Mesh, the batch axis split over the data-parallel axes.

Shapes: B host batch, P process count; a global array has the leading dim P*B, the rest unchanged.

Each host passes its own rows (host p's rows are rows [p B, (p+1) B) of the global batch, which is
what `pipeline.py` reads); `jax.make_array_from_process_local_data` assembles them. The sharding is
`NamedSharding(mesh, P(batch_axes, None, ...))`: dim 0 over `batch_axes` (default: the data-parallel
axes the mesh has, `flamingo_jax/parallel/partitioning.py: batch_spec`), every other dim replicated.
"""

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax.parallel import partitioning


def _axes(mesh: Mesh, batch_spec: P) -> tuple[str, ...]:
  """The mesh axes of the batch dim, checked to exist."""
  if len(batch_spec) != 1:
    raise ValueError(f'batch_spec must name the batch axis only, e.g. P(("data", "fsdp")); got {batch_spec}')
  entry = batch_spec[0]
  axes = () if entry is None else tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"batch_spec {batch_spec} names axes {missing} that the mesh {dict(mesh.shape)} lacks")
  return axes


def batch_sharding(mesh: Mesh, ndim: int, batch_spec: P | None = None) -> NamedSharding:
  """The sharding of a rank-`ndim` batch array: dim 0 over batch_spec's axes, the rest replicated."""
  batch_spec = partitioning.batch_spec(mesh) if batch_spec is None else batch_spec
  _axes(mesh, batch_spec)
  return NamedSharding(mesh, P(batch_spec[0], *([None] * (ndim - 1))))


def host_to_global(
  batch: Any, mesh: Mesh, batch_spec: P | None = None, process_count: int | None = None
) -> Any:
  """A pytree of host numpy arrays [B, ...] -> the same pytree of global jax.Arrays [P*B, ...].

  Works on one dataset's batch or on the whole `{name: batch}` of a mixture step.
  """
  process_count = jax.process_count() if process_count is None else process_count
  batch_spec = partitioning.batch_spec(mesh) if batch_spec is None else batch_spec
  axes = _axes(mesh, batch_spec)
  shards = math.prod(mesh.shape[a] for a in axes)

  def one(path, x):
    x = np.asarray(x)
    if x.ndim < 1:
      raise ValueError(f"{jax.tree_util.keystr(path)}: a batch array needs a batch dim, got a scalar")
    rows = x.shape[0] * process_count
    if rows % shards:
      raise ValueError(
        f"{jax.tree_util.keystr(path)}: global batch {rows} is not divisible by the "
        f"{shards} shards of mesh axes {axes}"
      )
    sharding = batch_sharding(mesh, x.ndim, batch_spec)
    return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

  return jax.tree_util.tree_map_with_path(one, batch)
