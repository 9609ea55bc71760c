"""The one set-up of a training step from its config: shapes, shardings and the jitted step.

    s = setup(config, mesh)            # nothing is read or allocated
    s.step.lower(s.state, s.batches)   # plan, benchmarks and tests compile exactly what the loop runs

Batch shapes come from the config's static per-dataset shapes (the input pipelines pad every batch to
them, `flamingo_jax/data/pipeline.py: example_shapes`), never from reading data. The loop
(`flamingo_jax/train/loop.py`) fills `state`'s shapes with real parameters (`init_params`).
MaxText's `train_compile.py` reuses its trainer's functions the same way.

Shapes: B global batch of a dataset, N images per sequence, F frames, S image side, T tokens.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flamingo_jax.models import flamingo
from flamingo_jax.parallel import logical, partitioning
from flamingo_jax.train import objectives as objectives_lib
from flamingo_jax.train import optimizer as optimizer_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import step as step_lib
from flamingo_jax.train import trainable as trainable_lib


class StepSetup(NamedTuple):
  objective: objectives_lib.Objective
  optimizer: Any  # optax.GradientTransformation over the trainable params
  state: state_lib.TrainState  # of jax.ShapeDtypeStruct, each with its sharding
  batches: dict  # {dataset: {key: jax.ShapeDtypeStruct}}, each with its sharding
  step: Any  # jax.jit(train_step) with explicit in/out shardings, state donated


def batch_shapes(config) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """{dataset: {key: ShapeDtypeStruct}} of one global batch per dataset (the batch format of
  docs/ARCHITECTURE.md: images [B,N,F,S,S,3] f32, media_mask [B,N], tokens/targets/loss_mask/
  media_index/token_mask [B,T])."""
  out = {}
  for name, ds in config.data.datasets.items():
    b, t, n, f, s = ds.batch_size, ds.max_tokens, ds.max_images, ds.num_frames, ds.image_size
    out[name] = dict(
      images=jax.ShapeDtypeStruct((b, n, f, s, s, 3), jnp.float32),
      media_mask=jax.ShapeDtypeStruct((b, n), jnp.bool_),
      tokens=jax.ShapeDtypeStruct((b, t), jnp.int32),
      targets=jax.ShapeDtypeStruct((b, t), jnp.int32),
      loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32),
      media_index=jax.ShapeDtypeStruct((b, t), jnp.int32),
      token_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_),
    )
  return out


def dataset_specs(config) -> dict[str, dict[str, Any]]:
  """{dataset: {'weight': lambda, 'micro_batches': k}}, the step's view of the mixture."""
  return {
    name: dict(weight=float(ds.weight), micro_batches=int(config.train.micro_batches[name]))
    for name, ds in config.data.datasets.items()
  }


def _init_batch(batches: dict) -> dict:
  """One row of the alphabetically first dataset: the params' shapes do not depend on which."""
  first = batches[sorted(batches)[0]]
  return {k: jax.ShapeDtypeStruct((1,) + s.shape[1:], s.dtype) for k, s in first.items()}


def init_params(config, objective, rng) -> dict:
  """Freshly initialised params (numpy, on the host), before any `init_from` source."""
  batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _init_batch(batch_shapes(config)))
  return jax.device_get(jax.jit(objective.init)(rng, batch))


def cast_frozen(frozen, dtype):
  """Frozen params (arrays or ShapeDtypeStructs) in the compute dtype (bf16 halves their memory);
  trainable stay fp32."""

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)

  return jax.tree.map(cast, frozen)


def split_params(config, params) -> tuple[dict, dict]:
  """(trainable, frozen) by the config's rules, frozen in the compute dtype (arrays or shapes)."""
  train_p, frozen_p = trainable_lib.split(params, list(config.trainable), list(config.frozen))
  return train_p, cast_frozen(frozen_p, flamingo.DTYPES[config.model.dtype])


def setup(config, mesh, special_ids=(), *, objective=None, batches=None) -> StepSetup:
  """The step of `config` on `mesh` with its abstract state and batches (nothing allocated).

  `special_ids`: token ids the contrastive text tower skips (<image>, <EOC>, BOS, EOS).
  `objective` and `batches` replace the config's objective and `batch_shapes(config)`; the
  benchmarks use them to train on precomputed visual features, with the rest of the set-up (freezing,
  optimizer, shardings, the jitted step) exactly the loop's."""
  constrain = logical.activation_constraint(mesh)
  objective = objective or objectives_lib.make_objective(config, special_ids, constrain)
  batches = batches or batch_shapes(config)
  params = jax.eval_shape(objective.init, jax.random.PRNGKey(0), _init_batch(batches))
  train_p, frozen_p = split_params(config, params)
  optimizer = optimizer_lib.make_optimizer(config.optim, train_p)
  state = jax.eval_shape(
    lambda p, f: state_lib.create(p, f, optimizer, jax.random.PRNGKey(1)), train_p, frozen_p
  )
  state_sh = partitioning.state_shardings(state, config.sharding.rules, mesh)
  batch_sh = partitioning.batch_shardings(batches, mesh)
  schedule = optimizer_lib.learning_rate_schedule(config.optim)
  step_fn = step_lib.make_train_step(
    objective, optimizer, dataset_specs(config), schedule, config.train.dataset_schedule
  )
  with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
  return StepSetup(
    objective=objective,
    optimizer=optimizer,
    state=jax.tree.map(with_sharding, state, state_sh),
    batches=jax.tree.map(with_sharding, batches, batch_sh),
    step=partitioning.jit_train_step(step_fn, state_sh, batch_sh),
  )
