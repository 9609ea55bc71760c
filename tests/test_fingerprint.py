"""Leaf fingerprints: any single changed element changes them; dtypes and sharded arrays."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax import fingerprint


def _tree():
  rng = np.random.default_rng(0)
  return {
    "w": rng.standard_normal((4, 6)).astype(np.float32),
    "b": jnp.asarray(rng.standard_normal(6), jnp.bfloat16),
    "flag": np.array([True, False]),
    "step": np.int32(3),
    "key": jax.random.key(0),
  }


def test_every_single_element_change_changes_the_fingerprint():
  tree = _tree()
  base = fingerprint.fingerprints(tree)
  assert set(base) == {"w", "b", "flag", "step", "key"}
  assert base["w"][0] == "float32" and base["b"][0] == "bfloat16"
  for i in range(tree["w"].size):
    w = tree["w"].copy()
    w.reshape(-1)[i] = np.nextafter(w.reshape(-1)[i], np.inf)  # the smallest possible change
    assert fingerprint.mismatches(base, {**tree, "w": w}) == ["w"]
  swapped = tree["w"][::-1].copy()  # same values, other places
  assert fingerprint.mismatches(base, {**tree, "w": swapped}) == ["w"]
  assert fingerprint.mismatches(base, {**tree, "flag": ~tree["flag"]}) == ["flag"]
  assert fingerprint.mismatches(base, tree) == []


def test_other_dtype_or_unknown_leaf_is_not_compared():
  tree = _tree()
  base = fingerprint.fingerprints(tree)
  assert fingerprint.mismatches(base, {**tree, "w": tree["w"].astype(np.float16)}) == []
  assert fingerprint.mismatches(base, {"other": np.zeros(3)}) == []


def test_sharded_array_gives_the_value_of_its_host_copy():
  mesh = jax.make_mesh((8,), ("data",))
  x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  assert fingerprint.fingerprints({"x": sharded}) == fingerprint.fingerprints({"x": x})
