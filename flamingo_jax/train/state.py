"""The training state: everything a step reads and writes, as one pytree (saved whole by Orbax)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
  step: jax.Array  # int32 [], updates applied + skipped so far
  params: Any  # trainable params (fp32 master copy)
  frozen: Any  # frozen params (compute dtype, e.g. bf16)
  opt_state: Any  # optax state over `params` only
  rng: jax.Array  # base key; the step's key is fold_in(rng, step)
  skipped: jax.Array  # int32 [], total skipped (non-finite) updates
  consecutive_skipped: jax.Array  # int32 [], skipped in a row (the loop stops past a bound)


def create(params, frozen, optimizer, rng) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    frozen=frozen,
    opt_state=optimizer.init(params),
    rng=rng,
    skipped=jnp.zeros((), jnp.int32),
    consecutive_skipped=jnp.zeros((), jnp.int32),
  )
