"""Tests of flamingo_jax.checkpoint: Orbax round trips, keep policy, async, resharding, init_from,
a save killed by SIGKILL."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax import checkpoint, init_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class State(NamedTuple):
  step: Any
  params: Any
  frozen: Any
  opt_state: Any
  rng: Any


def _state(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "vision_encoder/stem": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
    "lm/gated_xattn": {"attn_gate": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
  }
  frozen = {"lm/embed": {"embeddings": jnp.asarray(rng.normal(size=(5, 4)), jnp.bfloat16)}}
  opt = optax.adamw(1e-2, weight_decay=0.1)

  @jax.jit
  def one_update(params):  # non-trivial mu, nu and count (jitted: eager optax compiles op by op)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = one_update(params)
  return State(jnp.asarray(7, jnp.int32), params, frozen, opt_state, jax.random.PRNGKey(seed))


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_bit_identical_with_data_and_config(tmp_path):
  state = _state()
  data_state = {
    "step": np.int64(7),
    "seed": 0,
    "datasets": {"m3w": {"records": 12, "w": 0.5}},
    "names": ["a", "b"],
    "none": None,
  }
  config = ml_collections.ConfigDict({"model": {"size": "tiny"}})
  with checkpoint.Checkpointer(tmp_path, config=config) as ckpt:
    assert ckpt.save(7, state, data_state)
    ckpt.wait()
    restored, data = ckpt.restore(state_template=state)
    assert isinstance(restored, State)
    _assert_identical(restored, state)
    assert data == {
      "step": 7,
      "seed": 0,
      "datasets": {"m3w": {"records": 12, "w": 0.5}},
      "names": ["a", "b"],
      "none": None,
    }
    assert ckpt.restore_config() == {"model": {"size": "tiny"}}
    raw, none = ckpt.restore(7, restore_data=False)  # no template: dicts and lists
    assert none is None
    np.testing.assert_array_equal(
      raw["params"]["vision_encoder/stem"]["w"], state.params["vision_encoder/stem"]["w"]
    )
    with pytest.raises(TypeError, match=r"data_state.bad"):
      ckpt.save(8, state, {"bad": object()}, force=True)
    with pytest.raises(FileNotFoundError, match="step 3"):
      ckpt.restore(3)
    wrong = state._replace(params={**state.params, "lm/gated_xattn": {"attn_gate": jnp.zeros(3)}})
    with pytest.raises(ValueError, match=r"params/lm/gated_xattn/attn_gate has shape \(2,\)"):
      ckpt.restore(state_template=wrong)
    with pytest.raises(ValueError, match="leaf step: a ShapeDtypeStruct without a sharding"):
      ckpt.restore(state_template=state._replace(step=jax.ShapeDtypeStruct((), jnp.int32)))
    with pytest.raises(ValueError, match="not in the template"):
      ckpt.restore(state_template=state._replace(frozen={}))


def test_relative_workdir_saves_restores_and_inits(tmp_path, monkeypatch):
  # Orbax refuses relative paths; `launch/local.sh runs/main` passes one.
  monkeypatch.chdir(tmp_path)
  state = _state()
  with checkpoint.Checkpointer("runs/rel", config={"a": 1}) as ckpt:
    assert ckpt.save(7, state, {"step": 7}, force=True)
    ckpt.wait()
  assert checkpoint.latest_checkpoint_step("runs/rel") == 7
  template = {"vision_encoder/stem": {"w": np.zeros((3, 4), np.float32)}}
  loaded = init_from.load_params_subset("runs/rel", "^vision_encoder/", template)
  np.testing.assert_array_equal(loaded["vision_encoder/stem"]["w"], state.params["vision_encoder/stem"]["w"])
  with checkpoint.Checkpointer("runs/rel") as ckpt:
    restored, data = ckpt.restore(state_template=state)
  _assert_identical(restored, state)
  assert data == {"step": 7}


def test_interval_keep_policy_and_idempotent_save(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    saved = [ckpt.save(s, state, {"step": s}) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, state, {"step": 7}, force=True)
    assert not ckpt.save(7, state, {"step": 7}, force=True)  # already saved: no-op
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.latest_step() == 7
    assert ckpt.restore(6)[1] == {"step": 6}
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]


def test_async_save_survives_donation_and_wait(tmp_path):
  state = _state()
  expected = jax.tree.map(np.asarray, state)
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=True)
  assert ckpt.save(1, state, {"step": 1})
  for leaf in jax.tree.leaves(state):  # what a donating jitted step does to its input buffers
    leaf.delete()
  ckpt.wait()
  assert ckpt.latest_step() == 1
  assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored, _ = ckpt.restore(
    state_template=jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), expected
    )
  )
  _assert_identical(jax.tree.map(np.asarray, restored), expected)
  ckpt.close()


def test_restore_onto_a_mesh(tmp_path):
  dev0 = jax.devices()[0]
  rng = np.random.default_rng(1)
  tree = {
    "a": jax.device_put(rng.normal(size=(8, 6)).astype(np.float32), dev0),
    "b": jax.device_put(rng.normal(size=(4,)).astype(np.float32), dev0),
    "c": jax.device_put(np.arange(16, dtype=np.int32).reshape(2, 8), dev0),
  }
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, tree, {}, force=True)
    ckpt.wait()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {"a": P("data", "model"), "b": P(), "c": P(None, ("data", "model"))}
    template = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k]))
      for k, v in tree.items()
    }
    restored, _ = ckpt.restore(state_template=template)
  for k in tree:
    assert restored[k].sharding == template[k].sharding, k
    assert len(restored[k].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(tree[k]))


_KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from flamingo_jax import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": np.arange(6, dtype=np.float32)}, {"step": 1}, force=True)
    ckpt.wait()
    big = np.random.default_rng(0).standard_normal(int(sys.argv[2]), dtype=np.float32)
    print("saved 1", flush=True)
    ckpt.save(2, {"w": big}, {"step": 2}, force=True)
    time.sleep(600)
""")


def _bytes_under(directory, name) -> int:
  total = 0
  for root, _, files in os.walk(os.path.join(directory, name)):
    for f in files:
      with contextlib.suppress(OSError):  # renamed away meanwhile (Orbax finalising an item)
        total += os.path.getsize(os.path.join(root, f))
  return total


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  child = subprocess.Popen(
    [sys.executable, "-c", _KILLED_CHILD, str(tmp_path), str(64 << 20)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=env,
    cwd=REPO,
  )
  try:
    assert child.stdout.readline().strip() == b"saved 1", child.stderr.read().decode()[-3000:]
    deadline = time.time() + 120
    while _bytes_under(ckpt_dir, "2.orbax-checkpoint-tmp") < (4 << 20):  # part of the array written
      assert child.poll() is None and time.time() < deadline, child.stderr.read().decode()[-3000:]
      assert "2" not in os.listdir(ckpt_dir), "the save finished before the kill: use a bigger array"
      time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
  finally:
    if child.poll() is None:
      os.kill(child.pid, signal.SIGKILL)
      child.wait(30)
  names = os.listdir(ckpt_dir)
  assert "2" not in names and any("orbax-checkpoint-tmp" in n for n in names), names
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 1
  assert checkpoint.latest_checkpoint_step(tmp_path) == 1
  state, data = ckpt.restore()
  np.testing.assert_array_equal(state["w"], np.arange(6, dtype=np.float32))
  assert data == {"step": 1}
  ckpt.save(2, {"w": np.zeros(3, np.float32)}, {"step": 2}, force=True)  # step 2 is writable again
  ckpt.close()
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]  # the killed save's temp dir was cleaned up


def test_absolute_path_keeps_urls_and_anchors_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint.absolute_path("gs://bucket/runs/80b")) == "gs://bucket/runs/80b"
  assert str(checkpoint.absolute_path("runs/main")) == str(tmp_path / "runs" / "main")
  assert str(checkpoint.absolute_path(tmp_path)) == str(tmp_path)


def test_replicated_shards_are_cut_per_replica_only_from_the_minimum_slice(tmp_path, caplog):
  """Each replica-parallel slice is a program compiled per device: a small replicated array is written
  whole by one replica (no compile); one with 1 MiB per replica slice is cut across the 8 devices."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  small = jax.device_put(np.arange(8 * 64, dtype=np.float32).reshape(8, 64), replicated)
  per_slice = checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES // 4  # float32 elements of one slice
  big = jax.device_put(np.arange(8 * per_slice, dtype=np.float32).reshape(8, per_slice), replicated)
  for step, tree, slices in ((1, {"small": small}, 0), (2, {"small": small, "big": big}, 8)):
    caplog.clear()
    with jax.log_compiles(), checkpoint.Checkpointer(tmp_path / str(step)) as ckpt:
      ckpt.save(step, tree, {}, force=True)
      ckpt.wait()
      restored, _ = ckpt.restore()
    assert sum("Compiling jit(slice)" in r.getMessage() for r in caplog.records) == slices
    _assert_identical(restored, tree)
