"""Tests of flamingo_jax.parallel.sharding on the 8 simulated CPU devices (tests/conftest.py)."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax.parallel import logical, sharding
from flamingo_jax.parallel import mesh as mesh_lib


@pytest.fixture(name="mesh")
def _mesh():
  return mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _shapes(tree):
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=lambda x: isinstance(x, tuple)
  )


def _small_params():
  """A tiny tree in the Haiku layout of docs/ARCHITECTURE.md (L=2, D=4, Hq*dh=8, F=8, V=16)."""
  rng = np.random.default_rng(0)
  shapes = {
    "lm/embed": {"embeddings": (16, 4)},
    "lm/layers": {"attn_norm": (2, 4), "q": (2, 4, 8), "o": (2, 8, 4), "up": (2, 4, 8), "down": (2, 8, 4)},
    "lm/final_norm": {"scale": (4,)},
  }
  return jax.tree.map(
    lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )


def test_tree_paths():
  tree = {"lm/layers": {"q": 1, "o": 2}, "vision_encoder/~/stem": {"w": 3}}
  assert sharding.tree_paths(tree) == {
    "lm/layers": {"q": "lm/layers/q", "o": "lm/layers/o"},
    "vision_encoder/~/stem": {"w": "vision_encoder/~/stem/w"},
  }


def test_first_matching_rule_wins_and_regex_is_full_match(mesh):
  rules = [(r"lm/layers/q", P(None, "tensor")), (r"lm/.*", P()), (r"lm/layers/qq", P("data"))]
  specs = sharding.partition_specs(_shapes({"lm/layers": {"q": (2, 4, 8), "qq": (2, 4)}}), rules, mesh)
  assert specs == {"lm/layers": {"q": P(None, "tensor"), "qq": P()}}


def test_unmatched_parameter_raises_naming_it(mesh):
  with pytest.raises(ValueError, match=r"parameter 'lm/layers/k' \(shape \(2, 4\)\) matches no"):
    sharding.partition_specs(_shapes({"lm/layers": {"k": (2, 4)}}), [(r"lm/layers/q", P())], mesh)


def test_indivisible_dimension_raises_naming_param_dim_and_axes(mesh):
  tree = _shapes({"lm/layers": {"q": (2, 3, 8)}})
  with pytest.raises(ValueError) as err:
    sharding.partition_specs(tree, [(r".*", P(None, ("fsdp", "tensor")))], mesh)
  message = str(err.value)
  for part in ("'lm/layers/q'", "dim 1", "(size 3)", "('fsdp', 'tensor')", "(size 4)"):
    assert part in message


def test_replicate_fallback_logs_and_replicates_only_that_dim(mesh, caplog):
  tree = _shapes({"x": {"w": (3, 8)}})
  with caplog.at_level(logging.WARNING):
    specs = sharding.partition_specs(tree, [(r".*", P("fsdp", "tensor"))], mesh, fallback="replicate")
  assert specs == {"x": {"w": P(None, "tensor")}}
  assert "'x/w'" in caplog.text
  # A rule's own fallback wins over the caller's.
  specs = sharding.partition_specs(tree, [(r".*", P("fsdp", "tensor"), "replicate")], mesh)
  assert specs == {"x": {"w": P(None, "tensor")}}


def test_spec_longer_than_rank_and_unknown_axes_raise(mesh):
  with pytest.raises(ValueError, match=r"'x/b'.*rank 1"):
    sharding.partition_specs(_shapes({"x": {"b": (8,)}}), [(r".*", P(None, "tensor"))], mesh)
  with pytest.raises(ValueError, match=r"'x/b'.*unknown mesh axes \['model'\]"):
    sharding.partition_specs(_shapes({"x": {"b": (8,)}}), [(r".*", P("model"))], mesh)
  with pytest.raises(ValueError, match="more than one dimension"):
    sharding.partition_specs(_shapes({"x": {"w": (8, 8)}}), [(r".*", P("fsdp", "fsdp"))], mesh)


def test_axes_missing_from_the_mesh_are_dropped():
  mesh = mesh_lib.create_mesh({"data": 8})
  specs = sharding.partition_specs(_shapes({"lm/layers": {"q": (2, 4, 8)}}), "flamingo", mesh)
  assert specs == {"lm/layers": {"q": P(None, None, None)}}


def test_rule_sets_by_name_and_bad_rules(mesh):
  assert sharding.get_rules("flamingo") == sharding.FLAMINGO_RULES
  with pytest.raises(ValueError, match="unknown sharding rule set 'flamingoo'"):
    sharding.get_rules("flamingoo")
  with pytest.raises(ValueError, match="rule #1"):
    sharding.get_rules([(r".*", P()), (r"(", P())])
  with pytest.raises(ValueError, match="fallback must be one of"):
    sharding.get_rules([(r".*", P(), "ignore")])
  with pytest.raises(ValueError, match="PartitionSpec"):
    sharding.get_rules([(r".*", ("fsdp",))])


def test_flamingo_rules_on_the_documented_layout(mesh):
  # Shapes with L=2, X=2, D=8, Dr=4, Hq*dh=8, Hkv*dh=4, F=16, V=16, E=2; NFNet HWIO kernels.
  shapes = {
    "lm/embed": {"embeddings": (16, 8)},
    "lm/extra_embed": {"embeddings": (2, 8)},
    "lm/unembed": {"w": (8, 16)},
    "lm/layers": {
      "attn_norm": (2, 8),
      "q": (2, 8, 8),
      "k": (2, 8, 4),
      "v": (2, 8, 4),
      "o": (2, 8, 8),
      "mlp_norm": (2, 8),
      "gate": (2, 8, 16),
      "up": (2, 8, 16),
      "down": (2, 16, 8),
    },
    "lm/final_norm": {"scale": (8,)},
    "lm/gated_xattn": {
      "attn_gate": (2,),
      "ffw_gate": (2,),
      "attn_norm_scale": (2, 8),
      "attn_norm_bias": (2, 8),
      "q": (2, 8, 8),
      "k": (2, 4, 8),
      "v": (2, 4, 8),
      "o": (2, 8, 8),
      "ffw_norm_scale": (2, 8),
      "ffw_norm_bias": (2, 8),
      "ffw_in": (2, 8, 32),
      "ffw_out": (2, 32, 8),
    },
    "perceiver_resampler": {"latents": (64, 4)},
    "perceiver_resampler/~/layer_0/attn/o": {"w": (4, 4)},
    "perceiver_resampler/~/layer_0/ffw_in": {"w": (4, 16), "b": (16,)},
    "vision_encoder/~/stem_conv": {"w": (3, 3, 3, 16), "b": (16,), "gain": (16,)},
    "vision_encoder/~/block_0/conv0": {"w": (1, 1, 16, 3)},  # O = 3: replicated.
    "vision_encoder/~/block_0": {"skip_gain": ()},
  }
  specs = sharding.partition_specs(_shapes(shapes), "flamingo", mesh)
  assert specs["lm/embed"]["embeddings"] == P("tensor", "fsdp")
  assert specs["lm/extra_embed"]["embeddings"] == P(None, "fsdp")
  assert specs["lm/unembed"]["w"] == P("fsdp", "tensor")
  for name in ("q", "k", "v", "gate", "up"):
    assert specs["lm/layers"][name] == P(None, "fsdp", "tensor"), name
  for name in ("o", "down"):
    assert specs["lm/layers"][name] == P(None, "tensor", "fsdp"), name
  assert specs["lm/layers"]["attn_norm"] == P()
  assert specs["lm/gated_xattn"]["ffw_in"] == P(None, "fsdp", "tensor")
  assert specs["lm/gated_xattn"]["ffw_out"] == P(None, "tensor", "fsdp")
  assert specs["lm/gated_xattn"]["attn_gate"] == P()
  assert specs["lm/gated_xattn"]["ffw_norm_bias"] == P()
  assert specs["perceiver_resampler"]["latents"] == P()
  assert specs["perceiver_resampler/~/layer_0/attn/o"]["w"] == P("tensor", "fsdp")
  assert specs["perceiver_resampler/~/layer_0/ffw_in"] == {"w": P("fsdp", "tensor"), "b": P()}
  assert specs["vision_encoder/~/stem_conv"] == {"w": P(None, None, None, "tensor"), "b": P(), "gain": P()}
  assert specs["vision_encoder/~/block_0/conv0"]["w"] == P(None, None, None, None)
  assert specs["vision_encoder/~/block_0"]["skip_gain"] == P()


def _real_model_shapes():
  """Parameter shapes of the tiny Flamingo and a tiny contrastive model (flamingo_jax.models)."""
  import functools  # pylint: disable=g-import-not-at-top

  import ml_collections  # pylint: disable=g-import-not-at-top

  from flamingo_jax.models import (
    contrastive,  # pylint: disable=g-import-not-at-top
    flamingo,  # pylint: disable=g-import-not-at-top
  )

  cfg = flamingo.model_config("tiny")
  size = cfg.image_size
  flamingo_shapes = jax.eval_shape(
    flamingo.make_model(cfg).init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, 1, 1, size, size, 3)),
    jnp.zeros((1, 8), jnp.int32),
  )
  ccfg = ml_collections.ConfigDict(
    dict(
      vision_variant="test",
      embed_dim=16,
      text=dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_len=16),
    )
  )
  contrastive_shapes = jax.eval_shape(
    functools.partial(contrastive.make_contrastive_model(ccfg).init, is_training=False),
    jax.random.PRNGKey(0),
    jnp.zeros((2, 32, 32, 3)),
    jnp.zeros((2, 8), jnp.int32),
    jnp.ones((2, 8), bool),
  )
  return {"flamingo": flamingo_shapes, "contrastive": contrastive_shapes}


def test_rules_claim_every_parameter_of_the_real_models(mesh):
  for rule_set, shapes in _real_model_shapes().items():
    specs = sharding.partition_specs(shapes, rule_set, mesh)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs)[0]
    assert len(flat_specs) == len(jax.tree.leaves(shapes))
    for (key_path, spec), leaf in zip(flat_specs, jax.tree.leaves(shapes)):
      path = sharding.path_str(key_path)
      stacked = "/layers/" in path or path.startswith("lm/gated_xattn/")
      if stacked and len(spec):
        assert spec[0] is None, (rule_set, path, spec)  # The layer axis is never sharded.
      if leaf.ndim <= 1 or path.endswith(("bias", "scale", "offset", "gain")):
        assert all(e is None for e in spec), (rule_set, path, spec)
      if leaf.ndim >= 3 and stacked and leaf.size >= 512:
        assert spec in (P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")), (path, spec)


def test_scalar_catch_all_claims_only_scalars(mesh):
  assert sharding.partition_specs(_shapes({"head": {"log_temp": ()}}), "contrastive", mesh) == {
    "head": {"log_temp": P()}
  }
  with pytest.raises(ValueError, match="'head/w' .*matches no sharding rule"):
    sharding.partition_specs(_shapes({"head": {"w": (4, 4)}}), "flamingo", mesh)


def test_optimizer_state_shardings_follow_param_paths(mesh):
  params = _shapes({"lm/layers": {"q": (2, 4, 8), "o": (2, 8, 4)}, "lm/final_norm": {"scale": (4,)}})
  specs = sharding.partition_specs(params, "flamingo", mesh)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.1),
  )
  state_shapes = jax.eval_shape(tx.init, params)
  state_shardings = sharding.optimizer_state_shardings(state_shapes, specs, mesh)
  adam = state_shardings[1].inner_state[0]
  for moments in (adam.mu, adam.nu):
    assert jax.tree.map(lambda s: s.spec, moments) == specs
  assert adam.count.spec == P()
  assert state_shardings[1].hyperparams["learning_rate"].spec == P()
  # NamedShardings work as param specs too.
  again = sharding.optimizer_state_shardings(
    state_shapes, sharding.named_shardings(params, "flamingo", mesh), mesh
  )
  assert jax.tree.map(lambda s: s.spec, again) == jax.tree.map(lambda s: s.spec, state_shardings)
  with pytest.raises(ValueError, match="'0/extra' .*mirrors no parameter path"):
    sharding.optimizer_state_shardings(({"extra": jax.ShapeDtypeStruct((4,), jnp.float32)},), specs, mesh)


def test_device_put_and_jit_with_rule_shardings(mesh):
  params = _small_params()
  param_shardings = sharding.named_shardings(params, "flamingo", mesh)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  opt_shardings = sharding.optimizer_state_shardings(jax.eval_shape(tx.init, params), param_shardings, mesh)
  batch_sharding = NamedSharding(
    mesh, logical.logical_to_spec(("batch", None), mesh_axis_sizes=dict(mesh.shape))
  )
  placed = jax.device_put(params, param_shardings)
  q = placed["lm/layers"]["q"]
  assert q.sharding == param_shardings["lm/layers"]["q"]
  assert q.addressable_shards[0].data.shape == (2, 2, 4)  # [L, D/fsdp, Hq*dh/tensor]
  opt_state = jax.device_put(tx.init(params), opt_shardings)
  x = jax.device_put(np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32), batch_sharding)

  def loss_fn(p, x):
    h = x
    for i in range(2):
      h = h + jnp.tanh(h @ p["lm/layers"]["q"][i]) @ p["lm/layers"]["o"][i]
      h = h + jax.nn.relu(h @ p["lm/layers"]["up"][i]) @ p["lm/layers"]["down"][i]
    h = h * p["lm/final_norm"]["scale"]
    logits = h @ p["lm/embed"]["embeddings"].T
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  def step(p, s, x):
    grads = jax.grad(loss_fn)(p, x)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  jitted = jax.jit(
    step,
    in_shardings=(param_shardings, opt_shardings, batch_sharding),
    out_shardings=(param_shardings, opt_shardings),
  )
  new_params, new_state = jitted(placed, opt_state, x)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a.sharding, new_params), param_shardings)
  assert new_state[0].mu["lm/layers"]["o"].sharding.spec == P(None, "tensor", "fsdp")
  expected, _ = jax.jit(step)(params, tx.init(params), np.asarray(x))  # Unsharded reference.
  chex.assert_trees_all_close(jax.device_get(new_params), expected, rtol=1e-5, atol=1e-6)


def test_logical_to_spec():
  sizes = {"data": 2, "fsdp": 2, "tensor": 2}
  assert logical.logical_to_spec(("batch", "length", "heads"), mesh_axis_sizes=sizes) == P(
    ("data", "fsdp"), None, "tensor"
  )
  # Axes absent from the mesh are dropped; an indivisible dim is left unsharded.
  assert logical.logical_to_spec(("batch", "mlp"), mesh_axis_sizes={"fsdp": 4}) == P("fsdp", None)
  assert logical.logical_to_spec(("batch", "vocab"), mesh_axis_sizes=sizes, shape=(1, 6)) == P(None, "tensor")
  with pytest.raises(ValueError, match="logical axis 'hidden' has no rule"):
    logical.logical_to_spec(("batch", "hidden"))


def test_with_logical_constraint(mesh):
  x = jnp.ones((8, 4, 6))
  axes = ("batch", "length", "heads")
  assert logical.with_logical_constraint(x, axes) is x  # No mesh: a no-op.
  with pytest.raises(ValueError, match="do not match the rank"):
    logical.with_logical_constraint(x, ("batch",))
  out = jax.jit(lambda a: logical.with_logical_constraint(a * 2, axes, mesh=mesh))(x)
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
  with jax.set_mesh(mesh):
    out = jax.jit(lambda a: logical.with_logical_constraint(a * 2, axes))(x)
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_array_equal(np.asarray(out), 2 * np.ones((8, 4, 6)))


def test_the_model_places_its_residual_stream_by_the_constraint_it_is_given(mesh):
  """The LM names the residual stream's axes at every layer and xattn block; on a mesh the training
  set-up's constraint splits it over the batch (both data axes), and the logits are unchanged."""
  from flamingo_jax.models import flamingo, lm  # pylint: disable=g-import-not-at-top

  cfg = flamingo.model_config("tiny")
  seen = []

  def recording(x, axes):
    seen.append((x.shape, axes))
    return logical.activation_constraint(mesh)(x, axes)

  placed, plain = flamingo.make_model(cfg, recording), flamingo.make_model(cfg)
  images = jnp.zeros((8, 1, 1, cfg.image_size, cfg.image_size, 3))
  tokens = jnp.ones((8, 6), jnp.int32)
  params = plain.init(jax.random.PRNGKey(0), images, tokens)
  media_index = jnp.zeros((8, 6), jnp.int32)
  want = plain.forward(params, None, images, tokens, media_index)
  got = jax.jit(lambda p: placed.forward(p, None, images, tokens, media_index))(params)
  assert seen and {axes for _, axes in seen} == {lm.RESIDUAL_AXES}
  assert {shape for shape, _ in seen} == {(8, 6, cfg.lm.dim)}
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_the_public_checkpoints_flavours_are_claimed_by_the_rules(mesh):
  """A CLIP ViT, IDEFICS's xattn flavour (per-channel gates, qk norms, SwiGLU): every parameter is
  placed by the Flamingo rules and claimed once by the trainable / frozen rules."""
  from configs import flamingo as flamingo_config  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import trainable  # pylint: disable=g-import-not-at-top

  cfg = flamingo.model_config("tiny")
  with cfg.unlocked():
    cfg.vision_variant = "ViT-test"
    cfg.xattn.update(norm="rms", ffw="swiglu", ffw_hidden=48, qk_norm=True, gate_shape="vector")
  model = flamingo.make_model(cfg)
  images = jnp.zeros((1, 1, 1, 32, 32, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, jnp.zeros((1, 8), jnp.int32))
  assert {"q_norm", "k_norm", "ffw_gate_in"} <= set(shapes["lm/gated_xattn"])
  assert shapes["lm/gated_xattn"]["attn_gate"].shape[-1] == cfg.lm.dim
  sharding.partition_specs(shapes, "flamingo", mesh, fallback="replicate")
  trainable.check_claims(shapes, flamingo_config.TRAINABLE, flamingo_config.FROZEN)
