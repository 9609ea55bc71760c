"""Content fingerprints of array pytrees: one uint32 per leaf, computed on device.

Orbax stores raw array chunks without a checksum (zstd keeps incompressible data, such as trained
float weights, in raw blocks), so bytes flipped on disk can restore silently as other numbers. A
checkpoint therefore carries the fingerprint of every leaf of the state it saved, and a restore
recomputes and compares them (`flamingo_jax/checkpoint.py`).

The fingerprint of a leaf x with n elements is

    sum_i  bits(x)_i * (2654435761 * i + 1)   (mod 2**32, i = flat row-major index mod 2**32)

over the leaf's bit pattern widened to uint32 (bool, 8-, 16- and 32-bit types; typed PRNG keys via
their key data). Every weight is odd, so changing any single element always changes the sum, and the
position weights make permutations visible. It is a jitted reduction over the global array, so it
runs sharded on every host and every process obtains the same replicated values.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.parallel.sharding import path_str

_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash constant (odd)
_UINT_OF_WIDTH = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 [] for one array of any shape."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = jnp.dtype(x.dtype).itemsize
  if width not in _UINT_OF_WIDTH:
    raise TypeError(f"fingerprint: unsupported dtype {x.dtype} (itemsize {width})")
  bits = jax.lax.bitcast_convert_type(x, _UINT_OF_WIDTH[width]).astype(jnp.uint32)
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for d in reversed(range(x.ndim)):  # the flat index mod 2**32, without an iota of x.size elements
    index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
    stride *= x.shape[d]
  return jnp.sum(bits * (index * _GOLDEN + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
  return jax.tree.map(_leaf_fingerprint, tree)


def fingerprints(tree: Any) -> dict[str, list]:
  """{'a/b/c': [dtype name, uint32 as int]} for every array leaf of `tree` (jax or numpy arrays)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = [jnp.asarray(x) if isinstance(x, np.ndarray) else x for _, x in leaves]
  values = jax.device_get(_fingerprints(arrays))
  return {path_str(p): [str(x.dtype), int(v)] for (p, _), x, v in zip(leaves, arrays, values)}


def mismatches(saved: dict[str, list], tree: Any) -> list[str]:
  """The leaf paths of `tree` whose fingerprint differs from `saved`. Leaves absent from `saved`,
  or restored into another dtype than the one saved, are not compared."""
  now = fingerprints(tree)
  return sorted(
    k
    for k, (dtype, value) in now.items()
    if k in saved and saved[k][0] == dtype and int(saved[k][1]) != value
  )
