"""The hand count of a training step's FLOPs (`train/throughput.py`) against XLA's cost analysis of
the same step on an unrolled model (every layer group in the program once: XLA counts a loop's body
once), and the per-device rates of the training log."""

import math

import jax
import numpy as np
import pytest

from configs import common
from configs import flamingo as flamingo_config
from flamingo_jax.parallel.mesh import MESH_AXES
from flamingo_jax.train import setup as setup_lib
from flamingo_jax.train import throughput

B, T, N = 4, 64, 2


def _config(vision_variant: str):
  """A small matmul-dominated Flamingo (widths 128-256), its layer groups unrolled."""
  config = flamingo_config.get_config("size=tiny")
  with config.unlocked():
    m = config.model
    m.vision_variant = vision_variant
    m.lm.update(
      vocab_size=256, dim=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, ffw_hidden=768
    )
    m.xattn.update(every=2, num_heads=4, head_dim=64)
    m.resampler.update(dim=32, depth=2, num_latents=8, num_heads=2, head_dim=32, max_frames=1)
    m.scan_unroll = 8
    config.data = common.synthetic_data(m.image_size, pairs=(1.0, B, T, N, 1))
    config.train.micro_batches = {"pairs": 1}
  return config


@pytest.mark.parametrize(
  "vision_variant", ["ViT-test", "test"]
)  # a CLIP ViT (by hand), an NFNet (XLA's count)
def test_hand_count_matches_xla_on_an_unrolled_model(vision_variant):
  config = _config(vision_variant)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
  s = setup_lib.setup(config, mesh)
  cost = s.step.lower(s.state, s.batches).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  counted = throughput.step_flops(config.model, throughput.data_shapes(config.data))
  assert counted["lm"] > counted["trained"] > 0 and counted["vision"] > 0
  # XLA also counts norms, softmax, element-wise work and the optimizer, which the hand count leaves out.
  ratio = counted["step"] / float(cost["flops"])
  assert 0.9 < ratio <= 1.0, ratio  # 0.975 for both encoders when written


def test_rates_and_peaks():
  rates = throughput.throughput(flops=4e12, tokens=1000, step_s=0.5, devices=2, peak=10.0)
  assert rates == dict(tokens_per_s_per_device=1000.0, tflops_per_device=4.0, mfu=0.4)
  assert throughput.peak_tflops("TPU v5p") == 459.0 and throughput.peak_tflops("TPU v5 lite") == 197.0
  assert throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert math.isnan(throughput.peak_tflops("cpu")) and throughput.peak_tflops("cpu", 1.5) == 1.5
