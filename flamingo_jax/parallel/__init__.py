"""Meshes, sharding rules as data, and multi-host initialisation."""

from flamingo_jax.parallel.logical import DEFAULT_LOGICAL_RULES, logical_to_spec, with_logical_constraint
from flamingo_jax.parallel.mesh import MESH_AXES, create_mesh, maybe_initialize_distributed, mesh_from_config
from flamingo_jax.parallel.sharding import (
  FLAMINGO_RULES,
  RULE_SETS,
  get_rules,
  named_shardings,
  optimizer_state_shardings,
  partition_specs,
  tree_paths,
)

__all__ = [
  "DEFAULT_LOGICAL_RULES",
  "FLAMINGO_RULES",
  "MESH_AXES",
  "RULE_SETS",
  "create_mesh",
  "get_rules",
  "logical_to_spec",
  "maybe_initialize_distributed",
  "mesh_from_config",
  "named_shardings",
  "optimizer_state_shardings",
  "partition_specs",
  "tree_paths",
  "with_logical_constraint",
]
