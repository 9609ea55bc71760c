"""The token NLL's one-pass gradient equals the gradient of the plain log-softmax formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.train import objectives


def _reference(logits, targets, mask):
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask)


def test_token_nll_value_and_gradients_match_the_log_softmax_formula():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 5, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1.0)

  total, count = objectives.token_nll(logits, targets, mask)
  chex.assert_trees_all_close(total, _reference(logits, targets, mask), rtol=1e-6)
  assert float(count) == float(mask.sum())

  ours = jax.grad(lambda l, m: objectives.token_nll(l, targets, m)[0], argnums=(0, 1))(logits, mask)
  ref = jax.grad(_reference, argnums=(0, 2))(logits, targets, mask)
  chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-6)
  # Masked positions get no gradient at all.
  np.testing.assert_array_equal(np.asarray(ours[0])[np.asarray(mask) == 0], 0.0)


def test_token_nll_gradient_flows_back_to_bfloat16_logits():
  logits = jnp.ones((1, 3, 7), jnp.bfloat16)
  targets = jnp.array([[0, 1, 2]], jnp.int32)
  grad = jax.jit(jax.grad(lambda l: objectives.token_nll(l, targets, jnp.ones((1, 3)))[0]))(logits)
  assert grad.dtype == jnp.bfloat16
  chex.assert_trees_all_close(grad.astype(jnp.float32).sum(), jnp.float32(0.0), atol=1e-2)


def test_loss_normalisation_divides_the_same_sum_by_tokens_or_by_sequences():
  """Eq. 2's per-sequence sum and the per-token mean share the summed NLL; only the divisor differs
  (sequences with at least one target token, or target tokens)."""
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top
  from tests.train import helpers  # pylint: disable=g-import-not-at-top

  cfg = flamingo.model_config("tiny")
  batch = helpers.synthetic_batch(cfg, batch=4)
  batch["loss_mask"][3] = 0  # a row without targets counts as no sequence
  per_token = objectives.flamingo_objective(cfg)
  per_sequence = objectives.flamingo_objective(cfg, normalisation="per_sequence_sum")
  params = per_token.init(jax.random.PRNGKey(0), batch)
  total_t, tokens, _ = per_token.loss_sum(params, batch, None)
  total_s, sequences, _ = per_sequence.loss_sum(params, batch, None)
  assert float(total_t) == float(total_s)
  assert float(tokens) == batch["loss_mask"].sum() and float(sequences) == 3
  with np.testing.assert_raises_regex(ValueError, "per_sequence_sum"):
    objectives.flamingo_objective(cfg, normalisation="per_sequence_mean")


def test_paper_sizes_sum_each_sequence_and_the_small_configs_average_tokens():
  from configs import flamingo as flamingo_config  # pylint: disable=g-import-not-at-top
  from configs import main_job  # pylint: disable=g-import-not-at-top

  for size in ("3b", "9b", "80b"):
    assert flamingo_config.get_config(f"size={size}").loss_normalisation == "per_sequence_sum"
  assert flamingo_config.get_config("size=tiny").loss_normalisation == "per_token_mean"
  assert main_job.get_config().loss_normalisation == "per_token_mean"


def test_chunked_loss_equals_the_whole_logits_loss_in_value_and_gradients():
  """Chunks of 3 positions over T = 8 (padded to 9): the same sum, count and parameter gradients,
  the extra-token rows (trainable <image>/<EOC>) included, and no [B, T, V+E] buffer in the jaxpr."""
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top
  from tests.train import helpers  # pylint: disable=g-import-not-at-top

  cfg = flamingo.model_config("tiny")
  batch = helpers.synthetic_batch(cfg, batch=2)
  whole = objectives.flamingo_objective(cfg)
  chunked = objectives.flamingo_objective(cfg, loss_chunk=3)
  params = whole.init(jax.random.PRNGKey(0), batch)

  def value_and_grad(objective):
    loss = lambda p: objective.loss_sum(p, batch, None)[:2]  # (sum, count)
    return jax.value_and_grad(loss, has_aux=True)

  both = jax.jit(lambda p: (value_and_grad(whole)(p), value_and_grad(chunked)(p)))  # one compile
  ((total_w, _), grads_w), ((total_c, count), grads_c) = both(params)
  chex.assert_trees_all_close(total_c, total_w, rtol=1e-5)
  chex.assert_trees_all_close(grads_c, grads_w, rtol=2e-4, atol=1e-5)
  assert float(count) == batch["loss_mask"].sum()

  b, t = batch["tokens"].shape
  vocab = cfg.lm.vocab_size + cfg.lm.num_extra_tokens
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: chunked.loss_sum(p, batch, None)[0]))(params)
  shapes = {tuple(v.aval.shape) for eqn in _all_eqns(jaxpr.jaxpr) for v in eqn.outvars}
  assert (b, t, vocab) not in shapes and (b, 3, vocab) in shapes
  with np.testing.assert_raises_regex(ValueError, "loss_chunk"):
    objectives.flamingo_objective(cfg, loss_chunk=-1)


def _all_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (scan, remat, custom_vjp bodies)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_eqns(inner)
