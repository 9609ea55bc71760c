"""Training-step benchmark at the SmolLM2 shape, against this machine's matmul peak and flamingo-pytorch.

    .venv/bin/python benchmarks/train_step.py [--dtype bfloat16|float32] [--steps 5] [--peer]

Shape (benchmarks/README.md): frozen LM dim 576, 30 layers, 9 heads (3 kv), vocab 49152, xattn every 4,
resampler 6 x 64 latents, 64 precomputed visual tokens per image (width 576, the vision encoder is frozen
and its features are taken as given, as in the peer's `image_embeds` path), batch 4 x 128 tokens x 4 images,
trainable = resampler + xattn (+ the two new token rows), with the main job's optimizer and the loop's
set-up (`flamingo_jax/train/setup.py`). Prints step time, text tokens/s, peak RSS,
achieved FLOP/s (a hand count of the step's matmuls, `step_flops`) and its fraction of the dense-matmul FLOP/s
measured in the same run. `--peer` also times lucidrains' flamingo-pytorch 0.1.2 (torch 2.13 CPU) in a
separate venv (created on first use in /tmp/fj_peer_venv) at the same shape and prints the ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import main_job  # noqa: E402
from flamingo_jax.models import (
  flamingo,  # noqa: E402
)
from flamingo_jax.parallel import logical  # noqa: E402
from flamingo_jax.parallel import mesh as mesh_lib  # noqa: E402
from flamingo_jax.train import host_memory, objectives, throughput  # noqa: E402
from flamingo_jax.train import setup as setup_lib  # noqa: E402
from flamingo_jax.train import state as state_lib  # noqa: E402

B, T, N, LV = 4, 128, 4, 64
PEER_VENV = "/tmp/fj_peer_venv"


def peak_rss_gb() -> float:
  return host_memory.peak_rss_bytes() / 1e9


def matmul_peak(dtype, n=4096, reps=10) -> float:
  """Median GFLOP/s of an n x n matmul (bf16 inputs accumulate in fp32, XLA's fast CPU path)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / float(np.median(times)) / 1e9


def xla_memory_gb(compiled) -> dict:
  """XLA's buffer assignment of the compiled step in GB: arguments, outputs, aliased (donated) bytes,
  temporaries, and XLA's own peak estimate (NaN where the backend does not report it)."""
  m = compiled.memory_analysis()
  fields = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "peak": "peak_memory_in_bytes",
  }
  return {
    name: getattr(m, field, float("nan")) / 1e9 if m is not None else float("nan")
    for name, field in fields.items()
  }


def batch(cfg, seed=0, b=B, t=T, n=N, lv=LV):
  """Random tokens with n <image> markers evenly spaced, and [b, n, 1, lv, Dr] visual features."""
  rng = np.random.default_rng(seed)
  vocab = cfg.lm.vocab_size
  tokens = rng.integers(0, vocab, size=(b, t + 1)).astype(np.int32)
  for i in range(n):
    tokens[:, i * (t // n)] = vocab  # one <image> marker per chunk of t/n tokens
  media_index = (np.cumsum(tokens[:, :-1] == vocab, axis=1) - 1).astype(np.int32)
  return dict(
    features=rng.standard_normal((b, n, 1, lv, cfg.resampler.dim)).astype(np.float32),
    tokens=tokens[:, :-1],
    targets=tokens[:, 1:],
    media_index=media_index,
    token_mask=np.ones((b, t), bool),
    loss_mask=np.ones((b, t), np.float32),
  )


def step_flops(cfg, b=B, t=T, n=N, lv=LV) -> dict:
  """Matmul FLOPs of one training step at this shape, counted by hand (`flamingo_jax/train/throughput.py`,
  the training log's count) without the vision encoder: the features are precomputed here.

  The frozen LM needs its forward and the gradient w.r.t. its activations (2x forward); the trained
  resampler and xattn blocks need forward, activation and weight gradients (3x forward).
  """
  lm_fwd = throughput.lm_forward_flops(cfg.lm, b, t)
  trained_fwd = throughput.xattn_forward_flops(
    cfg.lm, cfg.xattn, cfg.resampler, b, t, n
  ) + b * n * throughput.resampler_forward_flops(cfg.resampler, 1, lv)
  return dict(forward=lm_fwd + trained_fwd, step=2 * lm_fwd + 3 * trained_fwd)


def feature_objective(model, n=N, loss_chunk: int = 0) -> objectives.Objective:
  """The Flamingo NLL on precomputed visual features (`forward_features`): resampler + LM only;
  `loss_chunk` > 0: the logits a chunk of positions at a time (`objectives.chunked_token_nll`)."""

  def init(rng, b):
    return model.init(rng, jnp.zeros((1, n, 1, 64, 64, 3)), b["tokens"][:1])

  def loss_sum(params, b, rng):
    inputs = (b["features"], b["tokens"], b["media_index"], b["token_mask"])
    output_fn = lambda output: model.forward_features(params, rng, *inputs, output=output)
    dtype = model.configs.dtype
    total, count = objectives.output_nll(output_fn, b["targets"], b["loss_mask"], loss_chunk, dtype)
    return total, count, {}

  return objectives.Objective("features", init, loss_sum, lambda p: {})


def model_config(dtype: str, remat: str = "none"):
  """The benchmark's model: SmolLM2 shape, resampler 6 x 64 at width 576, features precomputed."""
  cfg = flamingo.model_config("smollm2")
  cfg.dtype = dtype
  cfg.remat = remat
  cfg.vision_variant = "test"  # not run: features are precomputed
  with cfg.unlocked():
    cfg.resampler.dim = 576
  return cfg


def train_config(model_cfg, b=B, t=T, n=N):
  """The main job's training config (freezing, optimizer, sharding rules, mesh) over `model_cfg`,
  with one dataset of b x t tokens and n images."""
  config = main_job.get_config("only=m3w")
  config.model = model_cfg
  ds = config.data.datasets.m3w
  ds.batch_size, ds.max_tokens, ds.max_images = b, t, n
  return config


def step_setup(model_cfg, b=B, t=T, n=N, lv=LV, loss_chunk=0) -> tuple[setup_lib.StepSetup, dict]:
  """(the loop's step set-up on precomputed features, its config), on a `data` mesh of all devices."""
  config = train_config(model_cfg, b, t, n)
  host_batch = batch(model_cfg, b=b, t=t, n=n, lv=lv)
  shapes = {"m3w": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_batch)}
  mesh = mesh_lib.create_mesh(config.mesh.shape)
  model = flamingo.make_model(model_cfg, logical.activation_constraint(mesh))
  objective = feature_objective(model, n, loss_chunk)
  return setup_lib.setup(config, mesh, objective=objective, batches=shapes), config


def run_jax(dtype: str, steps: int, remat: str = "none") -> dict:
  cfg = model_config(dtype, remat)
  s, config = step_setup(cfg)
  b = batch(cfg)
  params = jax.jit(s.objective.init)(jax.random.PRNGKey(0), b)
  train_p, frozen_p = setup_lib.split_params(config, params)
  state = state_lib.create(train_p, frozen_p, s.optimizer, jax.random.PRNGKey(1))
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, s.state))
  t0 = time.perf_counter()
  compiled = s.step.lower(s.state, s.batches).compile()
  compile_s = time.perf_counter() - t0
  compile_peak_gb = peak_rss_gb()
  host_memory.release_freed_memory()  # as the training loop does after compiling
  memory = xla_memory_gb(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0))
  flops = float(step_flops(cfg)["step"])
  state, m = compiled(state, {"m3w": b})
  jax.block_until_ready(m["loss"])
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, {"m3w": batch(cfg, i + 1)})
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return dict(
    step_s=step_s,
    compile_s=compile_s,
    flops=flops,
    xla_flops=xla_flops,
    gflops_per_s=flops / step_s / 1e9,
    tokens_per_s=B * T / step_s,
    compile_peak_gb=compile_peak_gb,
    peak_rss_gb=peak_rss_gb(),
    memory=memory,
    loss=float(m["loss"]),
  )


PEER_SCRIPT = r"""
import ctypes, json, sys, time, torch
from flamingo_pytorch import FlamingoPaLM
torch.set_num_threads(2)
steps, bf16 = int(sys.argv[1]), sys.argv[2] == "bfloat16"
# Visual features are given. flamingo-pytorch 0.1.2's `embeds=` path raises a NameError (`video`), so
# they go in through `images=` with an identity "encoder": [B, N, 64, 576] -> the same features.
model = FlamingoPaLM(num_tokens=49152, dim=576, depth=30, heads=9, dim_head=64, cross_attn_every=4,
                     perceiver_num_latents=64, perceiver_depth=6, img_encoder=torch.nn.Identity(),
                     media_token_id=3)
# In flamingo mode (embeds given) the model itself freezes all but the resampler and xattn blocks.
opt = torch.optim.AdamW([p for n, p in model.named_parameters()
                         if "perceiver" in n or "layers" in n and ".1." in n], lr=1e-4)
B, T, N = 4, 128, 4
def one():
    text = torch.randint(4, 49152, (B, T + 1))
    text[:, ::T // N] = 3                   # one media marker per chunk of 32 tokens, as in ours
    embeds = torch.randn(B, N, 64, 576)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(text[:, :-1], images=embeds)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 49152), text[:, 1:].reshape(-1))
    loss.backward(); opt.step(); opt.zero_grad()
ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed heap back to the OS before stepping, as ours does
one()
times = []
for _ in range(steps):
    t0 = time.perf_counter(); one(); times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps(dict(step_s=times[len(times) // 2],
                      peak_rss_gb=next(int(l.split()[1]) for l in open("/proc/self/status")
                                       if l.startswith("VmHWM:")) / 1e6)))
"""


def run_peer(dtype: str, steps: int) -> dict:
  python = os.path.join(PEER_VENV, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
    subprocess.run(
      [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "torch==2.13.0",
        "flamingo-pytorch==0.1.2",
        "einops",
        "einops-exts",
      ],
      check=True,
    )
  out = subprocess.run(
    [python, "-c", PEER_SCRIPT, str(steps), dtype],
    capture_output=True,
    text=True,
    env=dict(os.environ, OMP_NUM_THREADS="2"),
  )
  if out.returncode:
    raise RuntimeError(f"the flamingo-pytorch run failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument(
    "--remat",
    default="none",
    choices=["none", "dots", "full"],
    help="rematerialisation of each (xattn block, 4 layers) group",
  )
  parser.add_argument("--peer", action="store_true")
  args = parser.parse_args()
  peak = matmul_peak(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
  ours = run_jax(args.dtype, args.steps, args.remat)
  print(f"matmul peak ({args.dtype} in, fp32 acc), this run: {peak:8.1f} GFLOP/s")
  print(
    f"flamingo_jax step ({args.dtype}, remat {args.remat}):  {ours['step_s']:.3f} s  | "
    f"{ours['tokens_per_s']:.0f} text tok/s | compile {ours['compile_s']:.1f} s | peak RSS "
    f"{ours['peak_rss_gb']:.2f} GB ({ours['compile_peak_gb']:.2f} GB when compiled)"
  )
  print("  XLA buffers of the step (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in ours["memory"].items()))
  print(
    f"  step FLOPs (hand count, step_flops) {ours['flops'] / 1e9:.0f} GFLOP -> "
    f"{ours['gflops_per_s']:.0f} GFLOP/s = {ours['gflops_per_s'] / peak:.0%} of the measured matmul peak "
    f"(XLA cost analysis: {ours['xla_flops'] / 1e9:.0f} GFLOP, loop bodies counted once)"
  )
  if args.peer:
    peer = run_peer(args.dtype, args.steps)
    print(
      f"flamingo-pytorch 0.1.2 step ({'bf16 autocast' if args.dtype == 'bfloat16' else 'fp32'}): "
      f"{peer['step_s']:.3f} s | peak RSS {peer['peak_rss_gb']:.2f} GB"
    )
    print(
      f"speed-up vs flamingo-pytorch: {peer['step_s'] / ours['step_s']:.2f}x ; "
      f"peak RSS ratio (ours/peer): {ours['peak_rss_gb'] / peer['peak_rss_gb']:.2f}"
    )


if __name__ == "__main__":
  main()
