"""The training step: exact accumulation, lambda weights once, meshes agree, freezing, NaN skips."""

import chex
import jax
import numpy as np
import optax
import pytest

from flamingo_jax.parallel import mesh as mesh_lib
from flamingo_jax.parallel import partitioning
from flamingo_jax.train import step as step_lib
from tests.train import helpers

_SGD = optax.sgd(1.0)  # params change by exactly -grad
_STEP_FNS = {}


def _run(state, objective, batches, datasets):
  """Runs one jitted step; compiled steps are shared between tests (compiling dominates test time)."""
  key = tuple(sorted((name, spec["weight"], spec["micro_batches"]) for name, spec in datasets.items()))
  if key not in _STEP_FNS:
    _STEP_FNS[key] = jax.jit(step_lib.make_train_step(objective, _SGD, datasets))
  return _STEP_FNS[key](state, batches)


def _delta(new, old):
  return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, old)


def _assert_normwise_close(actual, expected, rtol=1e-5):
  """fp32 sums in another order: relative error `rtol` over the whole tree (a few entries are sums of
  large cancelling terms, so an elementwise rtol would measure fp32 round-off, not the maths)."""
  a, e = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (actual, expected))
  assert np.max(np.abs(a - e)) <= rtol * np.max(np.abs(e))
  assert np.linalg.norm(a - e) <= rtol * np.linalg.norm(e)


@pytest.fixture(scope="module")
def setup():
  return helpers.tiny_setup(_SGD)


def test_micro_batches_accumulate_to_the_large_batch_gradient(setup):
  cfg, objective, _, state = setup
  batch = helpers.synthetic_batch(cfg, batch=8)
  results = []
  for k in (1, 4):
    new, metrics = _run(state, objective, {"m3w": batch}, {"m3w": dict(weight=1.0, micro_batches=k)})
    grads = jax.tree.map(lambda old, p: old - p, state.params, new.params)
    results.append((grads, metrics["loss"]))
  (grads_1, loss_1), (grads_k, loss_k) = results
  np.testing.assert_allclose(loss_k, loss_1, rtol=1e-5)
  _assert_normwise_close(grads_k, grads_1)


def test_lambda_weights_enter_exactly_once(setup):
  cfg, objective, _, state = setup
  a, b = helpers.synthetic_batch(cfg, seed=1), helpers.synthetic_batch(cfg, seed=2)
  mixed, m = _run(
    state,
    objective,
    {"m3w": a, "pairs": b},
    {"m3w": dict(weight=1.0, micro_batches=1), "pairs": dict(weight=0.2, micro_batches=1)},
  )
  only_a, ma = _run(state, objective, {"m3w": a}, {"m3w": dict(weight=1.0, micro_batches=1)})
  only_b, mb = _run(state, objective, {"pairs": b}, {"pairs": dict(weight=1.0, micro_batches=1)})
  np.testing.assert_allclose(m["loss"], ma["loss"] + 0.2 * mb["loss"], rtol=1e-5)
  delta = lambda p: jax.tree.map(lambda x, y: x - y, p, state.params)
  expected = jax.tree.map(lambda da, db: da + 0.2 * db, delta(only_a.params), delta(only_b.params))
  _assert_normwise_close(delta(mixed.params), expected)


@pytest.mark.parametrize("shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_meshes_give_the_same_step(setup, shape):
  cfg, objective, optimizer, state = setup
  batches = {"m3w": helpers.synthetic_batch(cfg, batch=8)}
  datasets = {"m3w": dict(weight=1.0, micro_batches=1)}
  ref_state, ref_metrics = _run(state, objective, batches, datasets)

  mesh = mesh_lib.create_mesh(shape)
  train_step = step_lib.make_train_step(objective, optimizer, datasets)
  state_sh = partitioning.state_shardings(state, "flamingo", mesh)
  batch_sh = partitioning.batch_shardings(batches, mesh)
  fn = partitioning.jit_train_step(train_step, state_sh, batch_sh, donate=False)
  new_state, metrics = fn(jax.device_put(state, state_sh), jax.device_put(batches, batch_sh))
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  # SGD(1.0): the parameter change is the gradient; compare it normwise (fp32 reductions run in another
  # order on another mesh).
  _assert_normwise_close(
    _delta(jax.device_get(new_state.params), state.params), _delta(ref_state.params, state.params)
  )


def test_frozen_params_bit_identical_and_trained_parts_change(setup):
  cfg, objective, _, state = setup
  new = state
  for i in range(3):
    new, metrics = _run(
      new,
      objective,
      {"m3w": helpers.synthetic_batch(cfg, seed=i)},
      {"m3w": dict(weight=1.0, micro_batches=1)},
    )
  chex.assert_trees_all_equal(new.frozen, state.frozen)  # incl. the original embedding rows
  eoc = cfg.lm.vocab_size + 1 - cfg.lm.vocab_size
  assert not np.array_equal(
    new.params["lm/extra_embed"]["embeddings"][eoc], state.params["lm/extra_embed"]["embeddings"][eoc]
  )
  assert not np.array_equal(new.params["lm/gated_xattn"]["q"], state.params["lm/gated_xattn"]["q"])
  assert not np.array_equal(
    new.params["lm/gated_xattn"]["attn_gate"], state.params["lm/gated_xattn"]["attn_gate"]
  )
  assert not np.array_equal(
    new.params["perceiver_resampler"]["latents"], state.params["perceiver_resampler"]["latents"]
  )
  assert "gate/attn_0" in metrics and "grad_norm" in metrics


def test_poisoned_batch_is_skipped_whole_then_training_resumes(setup):
  cfg, objective, _, state = setup
  fn = lambda s, b: _run(s, objective, b, {"m3w": dict(weight=1.0, micro_batches=4)})
  bad = helpers.synthetic_batch(cfg)
  bad["images"][3, 0, 0, 5, 5, 1] = np.nan
  after_bad, metrics = fn(state, {"m3w": bad})
  assert int(metrics["update_skipped"]) == 1 and int(after_bad.skipped) == 1
  assert int(after_bad.consecutive_skipped) == 1
  chex.assert_trees_all_equal(after_bad.params, state.params)
  chex.assert_trees_all_equal(after_bad.opt_state, state.opt_state)
  after_good, metrics = fn(after_bad, {"m3w": helpers.synthetic_batch(cfg, seed=5)})
  assert int(metrics["update_skipped"]) == 0 and int(after_good.consecutive_skipped) == 0
  assert int(after_good.skipped) == 1
  # At init only the gates and the new token rows get gradients (tanh(0) = 0 blocks the rest).
  assert not np.array_equal(
    after_good.params["lm/gated_xattn"]["attn_gate"], state.params["lm/gated_xattn"]["attn_gate"]
  )


def test_clipping_acts_on_the_accumulated_gradient(setup):
  """The global-norm clip sees the lambda-weighted sum over datasets and micro-batches, once."""
  cfg, objective, _, state = setup
  a, b = helpers.synthetic_batch(cfg, seed=3), helpers.synthetic_batch(cfg, seed=4)
  batches, datasets = (
    {"m3w": a, "pairs": b},
    {"m3w": dict(weight=1.0, micro_batches=2), "pairs": dict(weight=0.2, micro_batches=1)},
  )
  # The threshold is optimizer state, so one compiled step runs unclipped (inf) and clipped.
  clipped_sgd = optax.chain(optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=np.inf), _SGD)
  step_fn = jax.jit(step_lib.make_train_step(objective, clipped_sgd, datasets))

  def step_with_threshold(max_norm):
    opt_state = clipped_sgd.init(state.params)
    opt_state[0].hyperparams["max_norm"] = np.asarray(max_norm, np.float32)
    new, _ = step_fn(state._replace(opt_state=opt_state), batches)
    return jax.tree.map(lambda old, p: old - p, state.params, new.params)

  grads = step_with_threshold(np.inf)  # SGD(1): the step is the gradient
  norm = float(optax.global_norm(grads))
  step = step_with_threshold(norm / 2)
  _assert_normwise_close(step, jax.tree.map(lambda g: g / 2, grads), rtol=1e-4)


def test_round_robin_takes_one_dataset_per_step_in_turn(setup):
  """The ablation's step s is the accumulate step of dataset s mod M alone (lambda-weighted)."""
  cfg, objective, _, state = setup
  batches = {"m3w": helpers.synthetic_batch(cfg, seed=5), "pairs": helpers.synthetic_batch(cfg, seed=6)}
  datasets = {"m3w": dict(weight=1.0, micro_batches=1), "pairs": dict(weight=0.2, micro_batches=1)}
  turn = jax.jit(step_lib.make_train_step(objective, _SGD, datasets, dataset_schedule="round_robin"))
  for step, name in ((0, "m3w"), (1, "pairs"), (2, "m3w")):
    at_step = state._replace(step=np.asarray(step, state.step.dtype))
    got, metrics = turn(at_step, batches)
    # SGD(1): lambda times the dataset's own step (weight 1: a step compiled by the tests above).
    alone, _ = _run(at_step, objective, {name: batches[name]}, {name: dict(weight=1.0, micro_batches=1)})
    moved = lambda new: jax.tree.map(lambda a, b: a - b, state.params, new)
    weight = datasets[name]["weight"]
    expected = jax.tree.map(lambda d, w=weight: w * d, moved(alone.params))
    _assert_normwise_close(moved(got.params), expected, rtol=1e-5)
    other = "pairs" if name == "m3w" else "m3w"
    assert np.isfinite(metrics[f"loss/{name}"]) and np.isnan(metrics[f"loss/{other}"])
