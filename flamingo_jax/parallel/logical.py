"""Activations by *logical* axis names ('batch', 'length', 'embed', 'heads', 'mlp', 'vocab', ...),
mapped to mesh axes by rules (`DEFAULT_LOGICAL_RULES`), as MaxText's logical axis rules.

`with_logical_constraint` applies them inside `jit`. The model names the axes of its activations and
calls the `ActivationConstraint` it is built with (`models/layers.py`); `activation_constraint(mesh)`
is the one the training set-up passes, so the model never imports `parallel/`. Without it, on meshes
with 'fsdp', XLA keeps much of the activations replicated over 'fsdp' (docs/TPU.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax.parallel.sharding import entry_axes

# Logical activation axes -> mesh axes. The batch is split over both data-parallel axes.
DEFAULT_LOGICAL_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", None),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("media", None),
  ("latents", None),
)


def logical_to_spec(
  logical_axes: Sequence[str | None],
  rules: Sequence[tuple] = DEFAULT_LOGICAL_RULES,
  mesh_axis_sizes: Mapping[str, int] | None = None,
  shape: Sequence[int] | None = None,
) -> P:
  """Maps logical axis names to a PartitionSpec over mesh axes.

  Args:
    logical_axes: one logical name (or None) per dimension, e.g. ('batch', 'length', 'embed').
    rules: `(logical name, mesh axis | tuple of mesh axes | None)` pairs; the first pair wins.
    mesh_axis_sizes: the mesh's axis name -> size; mesh axes absent from it are dropped. None keeps
      all axes (no mesh to check against).
    shape: if given, a dimension its mesh axes do not divide is left unsharded (e.g. batch 1).

  Returns:
    The PartitionSpec; a mesh axis is used at most once (later dims lose it).

  Raises:
    ValueError: a logical name that has no rule.
  """
  table = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, mesh_axes)
  used, entries = set(), []
  for dim, logical in enumerate(logical_axes):
    if logical is None:
      entries.append(None)
      continue
    if logical not in table:
      raise ValueError(f"logical axis {logical!r} has no rule; known: {sorted(table)}.")
    axes = tuple(
      a
      for a in entry_axes(table[logical])
      if a not in used and (mesh_axis_sizes is None or a in mesh_axis_sizes)
    )
    if (
      shape is not None
      and mesh_axis_sizes is not None
      and shape[dim] % math.prod(mesh_axis_sizes[a] for a in axes)
    ):
      axes = ()
    used |= set(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def with_logical_constraint(
  x: jax.Array,
  logical_axes: Sequence[str | None],
  rules: Sequence[tuple] = DEFAULT_LOGICAL_RULES,
  mesh: Mesh | None = None,
) -> jax.Array:
  """`jax.lax.with_sharding_constraint` by logical axis names; a no-op without a mesh.

  The mesh is `mesh` if given, else the one set by `jax.set_mesh` (only its `Auto` axes are used);
  with neither, `x` is returned unchanged, so model code runs the same on one device.

  Args:
    x: an array of rank `len(logical_axes)`.
    logical_axes: one logical name (or None) per dimension of `x`.
    rules: logical -> mesh axes pairs, as `DEFAULT_LOGICAL_RULES`.
    mesh: optional concrete mesh.
  """
  if len(logical_axes) != x.ndim:
    raise ValueError(
      f"logical axes {tuple(logical_axes)} do not match the rank of an array of shape {x.shape}."
    )
  if mesh is None:
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
      return x
    sizes = {
      name: size
      for name, size, kind in zip(abstract.axis_names, abstract.axis_sizes, abstract.axis_types)
      if kind == AxisType.Auto
    }
    if not sizes:
      return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, sizes, x.shape))
  spec = logical_to_spec(logical_axes, rules, dict(mesh.shape), x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def activation_constraint(mesh: Mesh, rules: Sequence[tuple] = DEFAULT_LOGICAL_RULES):
  """The model's `ActivationConstraint` on `mesh`: `with_logical_constraint(x, axes, rules, mesh)`."""

  def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
    return with_logical_constraint(x, logical_axes, rules, mesh)

  return constrain
