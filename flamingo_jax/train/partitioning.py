"""Placing the train state and batches on a device mesh, and jitting the step with explicit shardings.

The state's shardings come from the config's parameter rules (flamingo_jax/parallel/sharding.py): params
and frozen params by path, optimiser-state leaves by the path of the parameter they mirror, scalars
replicated. Batches are split on their leading axis over the data-parallel mesh axes.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax.parallel import sharding as sharding_lib
from flamingo_jax.train import state as state_lib


def batch_spec(mesh) -> P:
  """Leading (batch) axis over whichever of ('data', 'fsdp') the mesh has."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return P(axes if axes else None)


def state_shardings(abstract_state: state_lib.TrainState, rules, mesh) -> state_lib.TrainState:
  """NamedShardings for every leaf of a (possibly abstract) TrainState."""
  replicated = NamedSharding(mesh, P())
  param_specs = sharding_lib.partition_specs(abstract_state.params, rules, mesh)
  return state_lib.TrainState(
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


def cast_frozen(frozen, dtype):
  """Frozen params (arrays or ShapeDtypeStructs) in the compute dtype (bf16 halves their memory);
  trainable stay fp32."""

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)

  return jax.tree.map(cast, frozen)
