"""The one training loop (both stages): data -> jitted sharded step -> metrics and Orbax checkpoints.

Resume order: this workdir's latest checkpoint > `config.init_from` sources > fresh initialisation.
SIGTERM (a TPU VM preemption notice) makes the loop save and exit cleanly at the next step boundary.
Run it with `python -m flamingo_jax.train --config configs/<x>.py[:args] --workdir DIR`.
"""

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from absl import logging

from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import init_from as init_from_lib
from flamingo_jax import sources
from flamingo_jax.data import global_batch
from flamingo_jax.parallel import mesh as mesh_lib
from flamingo_jax.train import host_memory, metrics_writer, preemption, throughput
from flamingo_jax.train import setup as setup_lib
from flamingo_jax.train import state as state_lib


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. too many consecutive non-finite steps)."""


def make_data(config, tokenizer, seed: int):
  """The mixture iterator of the config (`config.data.source`: 'mixture' or 'synthetic')."""
  lm = config.model.lm
  if config.data.source == "synthetic":
    from flamingo_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    return synthetic.SyntheticMixture(
      {k: dict(v) for k, v in config.data.datasets.items()},
      vocab_size=lm.vocab_size,
      image_id=lm.vocab_size,
      eoc_id=lm.vocab_size + 1,
      seed=seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  if config.data.source == "mixture":
    from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

    if tokenizer is None:
      raise ValueError("config.data.source='mixture' needs config.tokenizer")
    if tokenizer.vocab_size != lm.vocab_size + lm.num_extra_tokens:
      raise ValueError(
        f"tokenizer has {tokenizer.vocab_size} ids, the model {lm.vocab_size} + {lm.num_extra_tokens} extra"
      )
    return mixture.make_mixture(config.data, tokenizer, config.data.data_dir, seed=seed)
  raise ValueError(f"config.data.source must be 'mixture' or 'synthetic', got {config.data.source!r}")


def to_global(batches, mesh):
  """{name: host batch} -> {name: global jax.Array batch} on `mesh` (batch axis over data/fsdp)."""
  return {name: global_batch.host_to_global(b, mesh) for name, b in batches.items()}


class Setup(NamedTuple):
  """Everything a run steps with (`build`)."""

  mesh: jax.sharding.Mesh
  data: Any  # the mixture iterator of this process's rows, at step 0
  batches: dict  # {dataset: {key: ShapeDtypeStruct}} of the global batches, with their shardings
  state: state_lib.TrainState  # initial state, placed with the config's shardings
  step: Callable  # the jitted, sharded train step: (state, global batches) -> (state, metrics)


def build(config, tokenizer=None) -> Setup:
  """Mesh, data, initial state (fresh params + `init_from` sources) and the jitted step of a config.

  Shapes and shardings come from `setup.setup` (the config alone). Collective under multi-host: every
  process calls it."""
  mesh = mesh_lib.create_mesh(config.mesh.shape)
  special = (
    [] if tokenizer is None else [tokenizer.image_id, tokenizer.eoc_id, tokenizer.bos_id, tokenizer.eos_id]
  )
  abstract = setup_lib.setup(config, mesh, special)
  data = make_data(config, tokenizer, config.train.seed)
  rng = jax.random.PRNGKey(config.train.seed)
  params = setup_lib.init_params(config, abstract.objective, rng)
  end_id = None if tokenizer is None else tokenizer.eos_id
  params = init_from_lib.initial_params(config.init_from, config.model, params, end_id=end_id)
  train_p, frozen_p = setup_lib.split_params(config, params)
  state = state_lib.create(train_p, frozen_p, abstract.optimizer, jax.random.fold_in(rng, 1))
  state = jax.device_put(state, jax.tree.map(lambda s: s.sharding, abstract.state))
  return Setup(mesh, data, abstract.batches, state, abstract.step)


def _format_line(step, total, metrics, rate, examples_per_s, eta_s, rates=None):
  main = " ".join(f"{k}={float(v):.4f}" for k, v in metrics.items() if k == "loss" or k.startswith("loss/"))
  speed = ""
  if rates is not None:
    mfu = "n/a" if rates["mfu"] != rates["mfu"] else f"{rates['mfu']:.1%}"  # NaN: no known peak (CPUs)
    speed = (
      f"{rates['tokens_per_s_per_device']:.0f} tok/s/device {rates['tflops_per_device']:.3g} "
      f"TFLOP/s/device MFU {mfu} | "
    )
  return (
    f"step {step}/{total} | {rate:.2f} steps/s {examples_per_s:.1f} ex/s | {speed}"
    f"ETA {eta_s / 60:.1f} min | {main} | grad_norm={float(metrics['grad_norm']):.3f} "
    f"skipped={int(metrics['skipped'])}"
  )


def train(config, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`. Returns the last metrics as floats.

  `stop_after`: leave the loop after this many steps of this call (tests of interrupted runs).

  Long: the loop itself, top to bottom (resume, compile, step, log, checkpoint, preemption).
  """
  mesh_lib.maybe_initialize_distributed(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=1))
  built = build(config, sources.make_tokenizer(config.tokenizer))
  mesh, data, state, jitted = built.mesh, built.data, built.state, built.step

  ckpt = checkpoint_lib.Checkpointer(
    workdir,
    save_interval_steps=config.train.checkpoint_every,
    max_to_keep=config.train.keep_checkpoints,
    config=config,
  )
  if ckpt.latest_step() is not None:
    step, state, data_state = ckpt.restore_newest(state, fallback=config.train.checkpoint_fallback)
    data.set_state(data_state)
    logging.info("resumed from %s at step %d", workdir, step)

  total = config.train.total_steps
  start = int(state.step)
  if start < total:
    # Compiled ahead of the loop (every batch has the example's shapes), then the heap the compiler
    # freed is handed back, so the step's buffers do not come on top of it (host_memory.py).
    step_fn = jitted.lower(state, built.batches).compile()
    host_memory.release_freed_memory()
  writer = metrics_writer.MetricsWriter(workdir)
  uninstall = preemption.install_preemption_handler()
  examples_per_step = sum(int(d.batch_size) for d in config.data.datasets.values())
  # Live throughput (Flamingo steps; stage 1's towers have no hand count here).
  flops_per_step = tokens_per_step = None
  if config.objective == "flamingo":
    shapes = throughput.data_shapes(config.data)
    flops_per_step = throughput.step_flops(config.model, shapes)["step"]
    tokens_per_step = sum(b * t for b, t, _, _ in shapes.values())
  peak = throughput.peak_tflops(jax.devices()[0].device_kind, float(config.train.peak_tflops))
  last, t0, t_last, steps_done = {}, time.time(), time.time(), 0
  try:
    for step in range(start, total):
      batches = to_global(next(data), mesh)
      state, metrics = step_fn(state, batches)
      steps_done += 1
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for name, counts in data.metrics().items():
          for key, value in counts.items():
            metrics[f"data/{name}/{key}"] = float(value)
        now = time.time()
        rate = config.train.log_every / max(now - t_last, 1e-9)
        t_last = now
        eta = (total - done) / max(steps_done / max(now - t0, 1e-9), 1e-9)
        rates = None
        if flops_per_step is not None:
          rates = throughput.throughput(flops_per_step, tokens_per_step, 1 / rate, jax.device_count(), peak)
          metrics.update({f"perf/{k}": v for k, v in rates.items() if math.isfinite(v)})
        line = _format_line(done, total, metrics, rate, rate * examples_per_step, eta, rates)
        logging.info(line)
        print(line, flush=True)
        writer.write(done, metrics)
        last = metrics
        if (
          metrics["skipped"]
          and int(jax.device_get(state.consecutive_skipped)) >= config.train.max_consecutive_skips
        ):
          raise TrainingError(
            f"{int(state.consecutive_skipped)} consecutive non-finite steps at "
            f"step {done}; the last good state is in {workdir}"
          )
      ckpt.check_saves()  # a failed background save stops the run here, naming its step
      preempted = preemption.should_stop_all_hosts(preemption.preemption_requested())
      ckpt.save(done, state, data.get_state(), force=preempted or done == total)
      if preempted:
        logging.warning("SIGTERM: saved step %d, exiting", done)
        break
      if stop_after is not None and steps_done >= stop_after:
        ckpt.save(done, state, data.get_state(), force=True)
        break
  finally:
    try:
      ckpt.close()  # waits for the last save; raises CheckpointSaveError if it failed
    finally:
      writer.close()
      uninstall()
  if jax.process_index() == 0 and last:
    with open(os.path.join(workdir, "last_metrics.json"), "w", encoding="utf-8") as f:
      json.dump(last, f, indent=1)
  return last
