"""Host batches -> global jax.Arrays on the 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flamingo_jax.data import global_batch


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _batch(b, n=2, t=6):
  rng = np.random.default_rng(0)
  return {
    "m3w": {
      "images": rng.random((b, n, 1, 4, 4, 3), dtype=np.float32),
      "media_mask": np.ones((b, n), bool),
      "tokens": rng.integers(0, 9, (b, t), dtype=np.int32),
    },
    "pairs": {"tokens": rng.integers(0, 9, (b, t), dtype=np.int32)},
  }


def test_host_batch_becomes_sharded_global_arrays(mesh):
  host = _batch(8)
  out = global_batch.host_to_global(host, mesh)
  for path, x in jax.tree_util.tree_leaves_with_path(out):
    want = host[path[0].key][path[1].key]
    assert isinstance(x, jax.Array) and x.shape == want.shape and x.dtype == want.dtype
    assert x.sharding.spec == P(("data", "fsdp"), *[None] * (x.ndim - 1))
    assert x.addressable_shards[0].data.shape == (2, *want.shape[1:])  # 8 rows over 4 shards
    np.testing.assert_array_equal(np.asarray(x), want)


def test_custom_batch_spec(mesh):
  x = global_batch.host_to_global({"t": np.arange(12).reshape(2, 6)}, mesh, P("data"))["t"]
  assert x.sharding.spec == P("data", None)
  assert {s.data.shape for s in x.addressable_shards} == {(1, 6)}


def test_errors_name_the_problem(mesh):
  with pytest.raises(ValueError, match=r"lacks|\['pipe'\]"):
    global_batch.host_to_global(_batch(8), mesh, P(("data", "pipe")))
  with pytest.raises(ValueError, match="not divisible"):
    global_batch.host_to_global(_batch(6), mesh)
  with pytest.raises(ValueError, match="batch axis only"):
    global_batch.batch_sharding(mesh, 2, P("data", None))


def test_global_rows_count_all_processes(mesh):
  # With P processes the global batch has P times the host rows (here P=1 is real; the arithmetic
  # of the declared global shape is what multi-host relies on).
  with pytest.raises(ValueError, match="global batch 6 is not divisible"):
    global_batch.host_to_global({"t": np.zeros((3, 2))}, mesh, process_count=2)
