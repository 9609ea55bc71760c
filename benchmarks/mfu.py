"""Model FLOPs utilisation (MFU) of the Flamingo training step on an accelerator, for a ~1B config.

    python benchmarks/mfu.py [--size 1b|tiny] [--batch 32] [--remat none,dots] [--steps 10]
                             [--peak-tflops 989] [--out results.json]

Model `1b` (bf16 compute, fp32 master weights of the trained parts): a Chinchilla-style frozen LM of
1.0B parameters (dim 2048, 16 layers, 16 heads, GELU MLP 4.5x, vocab 32000, untied), a gated xattn block
before every 4th LM layer (4 blocks, 16 x 128 heads), the paper's Perceiver Resampler (width 1536, 6 layers,
64 latents). Trained: resampler + xattn (~0.39B). Batch: the paper's M3W shape, `--batch` sequences of 256
tokens with 5 images each, 100 visual tokens per image (NFNet-F6 at 320 px gives a 10x10 grid). The frozen
vision encoder's features are random and precomputed, at the resampler's width (the NFNet forward and its
3072 -> 1536 input projection are left out and not counted).

The step is the training loop's own (`flamingo_jax/train/setup.py`: the main job's freezing rules,
AdamW + clipping and non-finite skip, jitted with NamedShardings on a `data` mesh of all local
devices). FLOPs are counted by hand (`train_step.step_flops`: frozen LM forward + activation
gradients, trained parts forward + both gradients, no recomputation counted), so MFU = counted FLOPs / step time / peak. The peak is the
datasheet's dense bf16 rate (`--peak-tflops`, H100/H200 SXM: 989) and, measured in the same run, an
8192^3 bf16 matmul. Step time: `--steps` steps dispatched back to back, one sync at the end.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_step as bench  # noqa: E402

from flamingo_jax.models import flamingo  # noqa: E402
from flamingo_jax.train import setup as setup_lib  # noqa: E402
from flamingo_jax.train import state as state_lib  # noqa: E402
from flamingo_jax.train import trainable  # noqa: E402

# (tokens per sequence, images per sequence, visual tokens per image)
SHAPES = {"1b": (256, 5, 100), "tiny": (32, 2, 4)}


def model_config(size: str, remat: str, attention: str = "einsum"):
  """The benchmark's model config (see the module docstring); `attention` as `lm.attention` and
  `xattn.attention` ('fused': jax.nn.dot_product_attention, cuDNN flash attention on GPUs)."""
  if size == "tiny":
    cfg = flamingo.model_config("tiny")
    cfg.dtype = "bfloat16"
  else:
    cfg = flamingo.model_config("3b")  # paper LM family, resampler and xattn widths
    cfg.dtype = "bfloat16"
    cfg.vision_variant = "test"  # not run: features are precomputed
    with cfg.unlocked():
      cfg.lm.num_layers = 16
      cfg.xattn.every = 4
  cfg.remat = remat
  with cfg.unlocked():
    cfg.lm.attention = cfg.xattn.attention = attention
  return cfg


def measured_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
  """Mean TFLOP/s of an n x n x n bf16 matmul on the default device (after warm-up)."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  for _ in range(3):
    f(a, a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def device_peak_gb() -> float:
  """The process's peak device memory so far (a high-water mark over all settings run before)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 1e9


def timed(fn, args, steps: int) -> float:
  """Seconds per call of a compiled `fn(*args)` (warm-up first, one sync at the end)."""
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def breakdown(objective, state, batch, steps: int) -> dict:
  """Seconds of the loss forward alone and of forward + backward (no optimizer), same shardings."""

  def loss(p, f, b):
    total, count, _ = objective.loss_sum(trainable.merge(p, f), b, jax.random.PRNGKey(0))
    return total / count

  forward = jax.jit(loss)
  grad = jax.jit(jax.grad(loss))
  args = (state.params, state.frozen, batch["m3w"])
  return dict(forward_s=timed(forward, args, steps), forward_backward_s=timed(grad, args, steps))


def run(
  size: str,
  batch_size: int,
  remat: str,
  steps: int,
  with_breakdown: bool = False,
  attention: str = "einsum",
  loss_chunk: int = 0,
) -> dict:
  """Builds, compiles and times the step; returns its figures.

  Long: one measurement (build, lower, compile, time) end to end.
  """
  tokens, images, visual = SHAPES[size]
  cfg = model_config(size, remat, attention)
  shape = dict(b=batch_size, t=tokens, n=images, lv=visual)
  s, config = bench.step_setup(cfg, **shape, loss_chunk=loss_chunk)
  params = jax.jit(s.objective.init)(jax.random.PRNGKey(0), bench.batch(cfg, **shape))
  train_p, frozen_p = setup_lib.split_params(config, params)
  del params
  state = state_lib.create(train_p, frozen_p, s.optimizer, jax.random.PRNGKey(1))
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, s.state))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  n_train, n_frozen = count(state.params), count(state.frozen)

  batch_sh = jax.tree.map(lambda x: x.sharding, s.batches)
  batches = [jax.device_put({"m3w": bench.batch(cfg, seed=i, **shape)}, batch_sh) for i in range(2)]
  step = s.step
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  temp_gb = getattr(memory, "temp_size_in_bytes", 0) / 1e9 if memory is not None else float("nan")
  for i in range(2):  # warm-up
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready(metrics["loss"])
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % 2])
  loss = float(metrics["loss"])  # the one sync
  step_s = (time.perf_counter() - t0) / steps
  flops = float(bench.step_flops(cfg, **shape)["step"])
  parts = breakdown(s.objective, state, batches[0], steps) if with_breakdown else {}
  return dict(
    **parts,
    size=size,
    batch=batch_size,
    tokens=tokens,
    images=images,
    visual_tokens=visual,
    remat=remat,
    params_trained=n_train,
    params_frozen=n_frozen,
    compile_s=compile_s,
    step_s=step_s,
    tokens_per_s=batch_size * tokens / step_s,
    step_tflop=flops / 1e12,
    tflops_per_s=flops / step_s / 1e12,
    loss=loss,
    temp_gb=temp_gb,
    device_peak_gb=device_peak_gb(),
  )


def main():
  """Command line: runs each configuration and prints the table. Long: flags and table output."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="1b", choices=sorted(SHAPES))
  parser.add_argument("--batch", default="32", help="comma-separated batch sizes")
  parser.add_argument("--remat", default="dots,none", help="comma-separated: none, dots, full")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--attention", default="einsum,fused", help="comma-separated: einsum, fused")
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=989.0,
    help="datasheet dense bf16 peak of one device (H100/H200 SXM: 989)",
  )
  parser.add_argument(
    "--breakdown",
    action="store_true",
    help="also time the loss forward alone and forward + backward without the optimizer",
  )
  parser.add_argument(
    "--loss_chunk", default="0", help="comma-separated: 0 (whole logits) or positions per logits chunk"
  )
  parser.add_argument("--out", default="", help="write the results as JSON here too")
  args = parser.parse_args()
  devices = jax.devices()
  print(
    f"jax {jax.__version__}; {len(devices)} x {devices[0].device_kind} ({devices[0].platform})", flush=True
  )
  matmul = measured_matmul_tflops() if devices[0].platform != "cpu" else float("nan")
  peak = args.peak_tflops * len(devices)
  print(
    f"bf16 8192^3 matmul, this run: {matmul:.0f} TFLOP/s per device; datasheet peak {args.peak_tflops:.0f}",
    flush=True,
  )
  results = []
  settings = [
    (b, remat, attention, int(chunk))
    for b in [int(b) for b in args.batch.split(",")]
    for remat in args.remat.split(",")
    for attention in args.attention.split(",")
    for chunk in args.loss_chunk.split(",")
  ]
  for batch_size, remat, attention, chunk in settings:
    try:
      r = run(args.size, batch_size, remat, args.steps, args.breakdown, attention, chunk)
    except Exception as e:  # pylint: disable=broad-except  (an OOM at one setting: report, go on)
      print(
        f"batch {batch_size} remat {remat} {attention} loss_chunk {chunk}: FAILED {type(e).__name__}: "
        f"{str(e)[:300]}",
        flush=True,
      )
      continue
    r.update(attention=attention, loss_chunk=chunk)
    r.update(
      mfu=r["tflops_per_s"] / peak,
      of_measured_matmul=r["tflops_per_s"] / (matmul * len(devices)),
      matmul_tflops=matmul,
      peak_tflops=args.peak_tflops,
      device=devices[0].device_kind,
      num_devices=len(devices),
      jax=jax.__version__,
    )
    results.append(r)
    print(
      f"batch {batch_size:3d} x {r['tokens']} tok, remat {remat:4s}, {attention:6s}, chunk {chunk:3d}: "
      f"{r['step_s'] * 1e3:8.1f} ms/step"
      f" | {r['tokens_per_s']:9.0f} tok/s | {r['step_tflop']:.2f} TFLOP/step -> "
      f"{r['tflops_per_s']:6.1f} TFLOP/s | MFU {r['mfu']:.1%} (of measured matmul "
      f"{r['of_measured_matmul']:.1%}) | compile {r['compile_s']:.0f} s | XLA temp "
      f"{r['temp_gb']:.1f} GB, device peak so far {r['device_peak_gb']:.1f} GB | params {r['params_frozen'] / 1e9:.2f}B frozen + "
      f"{r['params_trained'] / 1e9:.2f}B trained | loss {r['loss']:.3f}",
      flush=True,
    )
    if args.breakdown:
      print(
        f"  loss forward {r['forward_s'] * 1e3:.1f} ms, forward + backward "
        f"{r['forward_backward_s'] * 1e3:.1f} ms, whole step {r['step_s'] * 1e3:.1f} ms",
        flush=True,
      )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
