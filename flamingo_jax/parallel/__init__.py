"""Meshes, sharding rules as data, and multi-host initialisation."""
from flamingo_jax.parallel.mesh import create_mesh
from flamingo_jax.parallel.mesh import maybe_initialize_distributed
from flamingo_jax.parallel.mesh import MESH_AXES
from flamingo_jax.parallel.mesh import mesh_from_config
from flamingo_jax.parallel.sharding import DEFAULT_LOGICAL_RULES
from flamingo_jax.parallel.sharding import FLAMINGO_RULES
from flamingo_jax.parallel.sharding import get_rules
from flamingo_jax.parallel.sharding import logical_to_spec
from flamingo_jax.parallel.sharding import named_shardings
from flamingo_jax.parallel.sharding import optimizer_state_shardings
from flamingo_jax.parallel.sharding import partition_specs
from flamingo_jax.parallel.sharding import RULE_SETS
from flamingo_jax.parallel.sharding import tree_paths
from flamingo_jax.parallel.sharding import with_logical_constraint
