"""Compile time of the Flamingo training step as the frozen LM grows deeper: 8 vs 30 vs 80 layers.

    .venv/bin/python benchmarks/compile_time.py [--layers 8,30,80] [--unrolled]

The SmolLM2-width model of benchmarks/train_step.py (dim 576, xattn every 4, resampler 6 x 64, precomputed
visual features, batch 4 x 128 tokens x 4 images) with `num_layers` set to each depth. For each depth it
times `jax.jit(step).lower(...)` (tracing) and `.compile()` (XLA) of the whole training step, from
abstract shapes (the loop's `setup`: no weights are materialised). The layers run under one `lax.scan` over
groups of (xattn block, 4 layers), so the compiled program should not grow with depth; `--unrolled` also
times `scan_unroll` = all groups (the CPU main job's setting), whose program does grow.
Prints seconds per depth and the ratio of the deepest to the shallowest (target: within 2x).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import train_step as bench  # noqa: E402


def compile_seconds(num_layers: int, scan_unroll: int) -> tuple[float, float]:
  """(lower seconds, compile seconds) of the training step with an LM of `num_layers` layers."""
  cfg = bench.model_config("float32")
  cfg.lm.num_layers = num_layers
  cfg.scan_unroll = scan_unroll
  s, _ = bench.step_setup(cfg)
  t0 = time.perf_counter()
  lowered = s.step.lower(s.state, s.batches)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="8,30,80")
  parser.add_argument("--unrolled", action="store_true")
  args = parser.parse_args()
  depths = [int(d) for d in args.layers.split(",")]
  modes = [("scanned", 1)] + ([("unrolled", 1000)] if args.unrolled else [])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; training step, batch 4 x 128, fp32")
  for mode, unroll in modes:
    totals = []
    for depth in depths:
      lower_s, compile_s = compile_seconds(depth, unroll)
      totals.append(lower_s + compile_s)
      print(
        f"{mode:9s} {depth:3d} layers: lower {lower_s:6.1f} s  compile {compile_s:6.1f} s  "
        f"total {lower_s + compile_s:6.1f} s",
        flush=True,
      )
    print(f"{mode:9s} ratio {depths[-1]} / {depths[0]} layers: {totals[-1] / totals[0]:.2f}x (target <= 2x)")


if __name__ == "__main__":
  jnp.zeros(())  # initialise the backend before timing
  main()
