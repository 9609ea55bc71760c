"""Placing the train state and batches on a device mesh, and jitting the step with explicit shardings.

Every placement decision lives in `flamingo_jax/parallel/`: parameter rules (`sharding.py`), the mesh
(`mesh.py`), and here the state's and batches' shardings; `flamingo_jax/data/global_batch.py` assembles
host batches with `batch_spec`.

The state's shardings come from the config's parameter rules (flamingo_jax/parallel/sharding.py): params
and frozen params by path, optimiser-state leaves by the path of the parameter they mirror, scalars
replicated. Batches are split on their leading axis over the data-parallel mesh axes.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax.parallel import sharding as sharding_lib


def batch_spec(mesh) -> P:
  """Leading (batch) axis over whichever of ('data', 'fsdp') the mesh has."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return P(axes if axes else None)


def state_shardings(abstract_state, rules, mesh):
  """NamedShardings for every leaf of a (possibly abstract) `train/state.py: TrainState`, as a TrainState."""
  replicated = NamedSharding(mesh, P())
  param_specs = sharding_lib.partition_specs(abstract_state.params, rules, mesh)
  return type(abstract_state)(
    step=replicated,
    params=jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs),
    frozen=sharding_lib.named_shardings(abstract_state.frozen, rules, mesh),
    opt_state=sharding_lib.optimizer_state_shardings(abstract_state.opt_state, param_specs, mesh),
    rng=replicated,
    skipped=replicated,
    consecutive_skipped=replicated,
  )


def batch_shardings(abstract_batches, mesh):
  """The same NamedSharding (batch axis split) for every batch leaf."""
  sharding = NamedSharding(mesh, batch_spec(mesh))
  return jax.tree.map(lambda _: sharding, abstract_batches)


def jit_train_step(train_step, state_sh, batch_sh, donate: bool = True):
  """`jax.jit` with explicit in/out shardings; the old state's buffers are donated."""
  replicated = NamedSharding(next(iter(jax.tree.leaves(state_sh))).mesh, P())
  return jax.jit(
    train_step,
    in_shardings=(state_sh, batch_sh),
    out_shardings=(state_sh, replicated),
    donate_argnums=(0,) if donate else (),
  )
