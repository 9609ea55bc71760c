"""One training step: a batch from every dataset, micro-batch accumulation, one optimiser update.

    grads = sum_m lambda_m * (sum over micro-batches of d loss_sum_m) / (sum of weights_m)

(paper §2.4: every step sees all datasets). `dataset_schedule='round_robin'` is the paper's ablation (Table 3): step
s takes the gradient of dataset s mod M alone (lambda-weighted; `lax.switch` runs only its branch, the
other batches are passed and unused). Micro-batches run under `lax.scan`; the clipping of the
optimiser chain sees the accumulated gradient. A non-finite loss or gradient skips the
whole update: params and optimiser state stay bit-identical and the skip counters move.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from flamingo_jax.train import objectives as objectives_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainable as trainable_lib


def split_micro(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...] taking every k-th example, so each micro-batch spans all data shards."""

  def one(x):
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by {k} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

  return jax.tree.map(one, batch)


def tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
  objective: objectives_lib.Objective,
  optimizer: optax.GradientTransformation,
  datasets: Mapping[str, dict],
  schedule=None,
  dataset_schedule: str = "accumulate",
):
  """Builds `train_step(state, batches) -> (state, metrics)`.

  Args:
    objective: the model's loss.
    optimizer: over the trainable params.
    datasets: {name: {'weight': lambda_m, 'micro_batches': k}} for every dataset of the mixture.
    schedule: the learning-rate schedule, only for the `train/lr` metric.
    dataset_schedule: 'accumulate' (every dataset every step) or 'round_robin' (one per step, in
      turn: the ablation).

  Long: the step (accumulation over datasets, clip, non-finite skip, update) read as one.
  """
  if dataset_schedule not in ("accumulate", "round_robin"):
    raise ValueError(
      f"train.dataset_schedule must be 'accumulate' or 'round_robin', got {dataset_schedule!r}"
    )
  names = sorted(datasets)

  def dataset_grads(params, frozen, batch, rng, k):
    def loss_fn(p, micro, r):
      total, weight, metrics = objective.loss_sum(trainable_lib.merge(p, frozen), micro, r)
      return total, (weight, metrics)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro = split_micro(batch, k)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(carry, xs):
      g_acc, l_acc, w_acc = carry
      mb, i = xs
      (loss, (weight, metrics)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      return (g_acc, l_acc + loss, w_acc + weight), metrics

    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if k == 1:
      # No loop for a single micro-batch: XLA:CPU runs a gradient inside a while loop ~4x slower (the
      # convolutions and dots of a loop body lose their fast paths), and the loop buys nothing here.
      (g_sum, l_sum, w_sum), metrics = body(init, (jax.tree.map(lambda x: x[0], micro), 0))
    else:
      (g_sum, l_sum, w_sum), metrics = jax.lax.scan(body, init, (micro, jnp.arange(k)))
    w = jnp.maximum(w_sum, 1e-9)
    return jax.tree.map(lambda g: g / w, g_sum), l_sum / w, jax.tree.map(jnp.mean, metrics)

  def weighted(state, batches, rng, i):
    """(lambda_i * gradient, lambda_i * loss, loss, metrics) of dataset names[i]."""
    spec = datasets[names[i]]
    g, loss, m = dataset_grads(
      state.params, state.frozen, batches[names[i]], jax.random.fold_in(rng, i), spec["micro_batches"]
    )
    return jax.tree.map(lambda x: spec["weight"] * x, g), spec["weight"] * loss, loss, m

  def accumulated(state, batches, rng):
    grads = jax.tree.map(jnp.zeros_like, state.params)
    total_loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for i, name in enumerate(names):
      g, weighted_loss, loss, m = weighted(state, batches, rng, i)
      grads = jax.tree.map(jnp.add, grads, g)
      total_loss = total_loss + weighted_loss
      metrics[f"loss/{name}"] = loss
      for key, value in m.items():
        metrics[f"{name}/{key}"] = value
    return grads, total_loss, metrics

  def one_in_turn(state, batches, rng):
    """Dataset step mod M alone; its loss is reported, the others' as NaN (not computed)."""
    branches = [lambda s, b, r, i=i: weighted(s, b, r, i)[:3] for i in range(len(names))]
    current = state.step % len(names)
    grads, total_loss, loss = jax.lax.switch(current, branches, state, batches, rng)
    metrics = {f"loss/{name}": jnp.where(current == i, loss, jnp.nan) for i, name in enumerate(names)}
    return grads, total_loss, metrics

  def train_step(state: state_lib.TrainState, batches: Mapping[str, dict]):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, total_loss, metrics = (one_in_turn if dataset_schedule == "round_robin" else accumulated)(
      state, batches, rng
    )

    finite = jnp.isfinite(total_loss) & tree_all_finite(grads)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = state._replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt, state.opt_state),
      skipped=state.skipped + skipped,
      consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1),
    )
    metrics.update(
      {
        "loss": total_loss,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(new_state.params),
        "skipped": new_state.skipped,
        "update_skipped": skipped,
      }
    )
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    metrics.update(objective.param_metrics(new_state.params))
    return new_state, metrics

  return train_step
