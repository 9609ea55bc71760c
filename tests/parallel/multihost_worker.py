"""One process of the two-process CPU test (tests/parallel/test_multihost.py), or its 1-process reference.

    python tests/parallel/multihost_worker.py --port 12345 --process_id 0 --num_processes 2 --out DIR

Builds the tiny Flamingo train state exactly as `flamingo_jax/train/loop.py` does (same seed, same
helpers), places it on a {'data': 4, 'fsdp': 2} mesh over all global devices, feeds this host's rows of
one synthetic mixture step through `host_to_global`, runs one jitted sharded train step and gathers to
every process (a collective): the loss, the trainable params before and after the step, each host's own
batch rows and the assembled global batch. Only process 0 writes them, to `OUT/process_<id>.npz`.

Run it with `XLA_FLAGS=--xla_force_host_platform_device_count=4` and `JAX_PLATFORMS=cpu`.
"""

import argparse
import os
import sys

# `python tests/parallel/multihost_worker.py` puts this folder, not the checkout, on sys.path.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

MESH = {"data": 4, "fsdp": 2}
DATASETS = ("m3w",)


def make_config():
  """The tiny synthetic-data config (m3w only) with the test's mesh and a smooth first AdamW update.

  Adam's first update is lr * g / (|g| + eps): with the default eps (1e-8) it is lr * sign(g), which
  flips on fp32 round-off wherever a gradient is ~0, so two meshes could not agree normwise. With eps = 1
  the update is ~lr * g and a normwise comparison measures the sharded maths. No warm-up: the default
  schedule has lr = 0 at step 0, which would leave the params unchanged.
  """
  from configs import flamingo as flamingo_config  # pylint: disable=g-import-not-at-top

  config = flamingo_config.get_config("size=tiny")
  with config.unlocked():
    for name in [n for n in config.data.datasets if n not in DATASETS]:
      del config.data.datasets[name]  # one dataset: a third of the compile time
    config.mesh.shape = dict(MESH)
    config.optim.warmup_steps = 0
    config.optim.eps = 1.0
  return config


def _flat(tree, prefix: str) -> dict:
  """{'prefix/a/b': np.ndarray} for a nested dict of arrays."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    out[f"{prefix}/{key}"] = np.asarray(leaf)
  return out


def _gather(tree):
  """Global jax.Arrays (sharded over every process's devices) -> whole numpy arrays, on every process."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def run_step(config) -> dict:
  """Builds the loop's state, takes one synthetic step on this process's rows, runs one train step.

  Collective: every process of the job must call it. Returns flat numpy arrays (identical on every
  process): `loss`, `grad_norm`, `init/<param path>`, `new/<param path>`, `global/<dataset>/<key>` and
  `host<p>/<dataset>/<key>` for every process p.
  """
  from flamingo_jax.train import loop  # pylint: disable=g-import-not-at-top

  # The loop's own set-up (minus checkpoints and metrics files); the data holds this process's rows.
  setup = loop.build(config)
  state, data, jitted = setup.state, setup.data, setup.step
  init_params = _gather(state.params)
  host_batches = next(data)
  batches = loop.to_global(host_batches, setup.mesh)
  state, metrics = jitted(state, batches)

  out = {"loss": _gather(metrics["loss"]), "grad_norm": _gather(metrics["grad_norm"])}
  out.update(_flat(init_params, "init"))
  out.update(_flat(_gather(state.params), "new"))
  out.update(_flat(_gather(batches), "global"))
  hosts = multihost_utils.process_allgather(host_batches)  # host-local: [process, rows, ...]
  for p in range(jax.process_count()):
    out.update(_flat(jax.tree.map(lambda x, p=p: x[p], hosts), f"host{p}"))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--out", required=True, help="folder for process_0.npz (process 0 only)")
  args = parser.parse_args(argv)

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from flamingo_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  assert mesh_lib.maybe_initialize_distributed(
    coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes, process_id=args.process_id
  )
  assert jax.process_index() == args.process_id and jax.process_count() == args.num_processes
  results = run_step(make_config())
  if jax.process_index() == 0:
    path = os.path.join(args.out, f"process_{jax.process_index()}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **results)
    os.replace(tmp, path)
  print(
    f"DONE process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices, "
    f"loss {float(results['loss']):.6f}",
    flush=True,
  )
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
