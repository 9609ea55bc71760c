"""init_from: partial loads from runs and params-only saves, and `initial_params`, the one path by which a
run starts from weights (LM with its config checked, stage-1 vision encoder, a Flamingo run's trained parts)."""

import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import main_job
from flamingo_jax import checkpoint, init_from, sources
from flamingo_jax.models import flamingo
from tests.test_checkpoint import _state


def _params_only_save(directory, params):
  """The converter's layout: DIR/params (StandardCheckpointer) + DIR/lm_config.json."""
  os.makedirs(directory)
  with ocp.StandardCheckpointer() as c:
    c.save(os.path.join(directory, "params"), params)
    c.wait_until_finished()
  with open(os.path.join(directory, "lm_config.json"), "w") as f:
    f.write("{}")


def _template():
  return {
    "vision_encoder/stem": {"w": np.zeros((3, 4), np.float32)},
    "lm/embed": {"embeddings": np.zeros((5, 4), np.float32)},
    "lm/gated_xattn": {"attn_gate": np.zeros((2,), np.float32)},
  }


def test_load_params_subset_from_run_and_params_only(tmp_path):
  source = _state(seed=3)
  run = tmp_path / "contrastive"
  with checkpoint.Checkpointer(run) as ckpt:
    ckpt.save(5, source, {}, force=True)
  out = init_from.load_params_subset(str(run), r"^vision_encoder/", _template())
  np.testing.assert_array_equal(out["vision_encoder/stem"]["w"], source.params["vision_encoder/stem"]["w"])
  assert isinstance(out["vision_encoder/stem"]["w"], np.ndarray)
  np.testing.assert_array_equal(out["lm/embed"]["embeddings"], 0)  # not selected: unchanged
  # Frozen params of a run count too; the dtype follows the template (bf16 -> f32).
  out = init_from.load_params_subset(run / "checkpoints", r"^lm/embed", _template(), step=5)
  np.testing.assert_array_equal(
    out["lm/embed"]["embeddings"], np.asarray(source.frozen["lm/embed"]["embeddings"], np.float32)
  )
  assert out["lm/embed"]["embeddings"].dtype == np.float32
  # A sharded template leaf comes back with its sharding.
  mesh = jax.make_mesh((8,), ("data",))
  sharded = _template()
  sharded["vision_encoder/stem"]["w"] = jax.device_put(jnp.zeros((3, 4)), NamedSharding(mesh, P()))
  out = init_from.load_params_subset(run, "stem", sharded)
  assert out["vision_encoder/stem"]["w"].sharding == NamedSharding(mesh, P())

  lm_dir = str(tmp_path / "lm")
  embed = np.arange(20, dtype=np.float32).reshape(5, 4)
  _params_only_save(lm_dir, {"lm/embed": {"embeddings": embed}})
  out = init_from.load_params_subset(lm_dir, r"^lm/embed/", _template())
  np.testing.assert_array_equal(out["lm/embed"]["embeddings"], embed)
  # Prefix renaming: a source 'encoder/...' fills the template's 'vision_encoder/...'.
  renamed = str(tmp_path / "renamed")
  _params_only_save(renamed, {"encoder/stem": {"w": np.ones((3, 4), np.float32)}})
  out = init_from.load_params_subset(
    renamed,
    "^vision_encoder/",
    _template(),
    kind="params",
    strip_prefix="encoder/",
    add_prefix="vision_encoder/",
  )
  np.testing.assert_array_equal(out["vision_encoder/stem"]["w"], 1)


def test_load_params_subset_errors(tmp_path):
  lm_dir = str(tmp_path / "lm")
  _params_only_save(lm_dir, {"lm/embed": {"embeddings": np.zeros((7, 4), np.float32)}})
  with pytest.raises(ValueError, match=r"param vision_encoder/stem/w .* is missing"):
    init_from.load_params_subset(lm_dir, "^vision_encoder/", _template())
  with pytest.raises(ValueError, match=r"lm/embed/embeddings: shape \(7, 4\) .* \(5, 4\)"):
    init_from.load_params_subset(lm_dir, "^lm/embed", _template())
  with pytest.raises(ValueError, match="matches no template param"):
    init_from.load_params_subset(lm_dir, "^nothing", _template())
  with pytest.raises(FileNotFoundError):
    init_from.load_params_subset(str(tmp_path / "absent"), ".", _template())


def _sources(**kw):
  return ml_collections.ConfigDict(dict(dict(lm="", vision="", flamingo=""), **kw))


def test_initial_params_loads_vision_and_flamingo_sources_and_refuses_overlap(tmp_path):
  vis = tmp_path / "vis"
  with checkpoint.Checkpointer(vis) as ckpt:
    ckpt.save(2, {"params": {"vision_encoder/stem": {"w": np.full((3, 4), 2, np.float32)}}}, {}, force=True)
  run = tmp_path / "flamingo_run"
  with checkpoint.Checkpointer(run) as ckpt:
    trained = {"lm/gated_xattn": {"attn_gate": np.full((2,), 0.5, np.float32)}}
    frozen = {"lm/embed": {"embeddings": np.full((5, 4), 9, np.float32)}}
    ckpt.save(7, {"params": trained, "frozen": frozen}, {}, force=True)
  params = init_from.initial_params(_sources(vision=str(vis), flamingo=str(run)), None, _template())
  np.testing.assert_array_equal(params["vision_encoder/stem"]["w"], 2)
  np.testing.assert_array_equal(params["lm/gated_xattn"]["attn_gate"], 0.5)
  np.testing.assert_array_equal(params["lm/embed"]["embeddings"], 0)  # the run's frozen LM is not taken
  chex.assert_trees_all_equal(init_from.initial_params(_sources(), None, _template()), _template())
  with pytest.raises(ValueError, match="lm/embed/embeddings is selected by"):
    sources = [init_from.InitSource(str(run), "checkpoint", "^lm/")] * 2
    init_from.apply_init_from(sources, _template())
  with pytest.raises(ValueError, match=r"unknown keys \['slect'\]"):
    init_from.InitSource.from_dict({"path": str(run), "kind": "params", "slect": "."})
  with pytest.raises(FileNotFoundError, match="nowhere"):
    init_from.initial_params(_sources(vision=str(tmp_path / "nowhere")), None, _template())


def test_initial_params_checks_the_lm_source_config():
  config = main_job.get_config()
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), flamingo.param_shapes(config.model))
  loaded = init_from.initial_params(_sources(lm="smollm2"), config.model, params, end_id=0)
  _, lm_params = sources.load_lm("smollm2", np.float32)
  np.testing.assert_array_equal(loaded["lm/final_norm"]["scale"], lm_params["lm/final_norm"]["scale"])
  with config.unlocked():
    config.model.lm.rope_theta = 10_000.0  # SmolLM2's is 100000: a wrong value must not pass silently
  with pytest.raises(ValueError, match=r"rope_theta: source 100000.0 != model 10000.0"):
    init_from.initial_params(_sources(lm="smollm2"), config.model, params)
