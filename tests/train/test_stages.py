"""Both training stages through the real entry point, `python -m flamingo_jax.train`, on tiny configs:
stage 1 (contrastive NFNet + text tower, the paper's optimizer recipe) writes a run whose vision encoder
then starts stage 2."""

import json
import os
import subprocess
import sys

import numpy as np

from flamingo_jax import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(config: str, workdir: str, *flags: str) -> str:
  cmd = [sys.executable, "-m", "flamingo_jax.train", f"--config={config}", f"--workdir={workdir}", *flags]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    check=False,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


def _state(workdir):
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    return ckpt.restore()[0]


def test_stage_1_then_stage_2_from_its_vision_encoder(tmp_path):
  stage1, stage2 = str(tmp_path / "contrastive"), str(tmp_path / "flamingo")
  out = _train("configs/contrastive.py:size=tiny,recipe=paper", stage1)
  assert "step 4/4" in out
  with open(os.path.join(stage1, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  losses = [r["train/loss"] for r in records]
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  # App. B.1.3 through the loop: a 1-step warm-up from 0 to 1e-3, then a linear fall by equal steps,
  # reaching 0 where the run ends (Adam, AGC on the NFNet and the text tower's own clip are pinned in
  # test_optimizer).
  rates = np.array([r["train/lr"] for r in records])
  assert rates[0] == 0.0 and np.all(np.diff(rates[1:]) < 0)
  np.testing.assert_allclose(rates[1], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(np.diff(rates[1:]), np.diff(rates[1:])[0], rtol=1e-5)
  np.testing.assert_allclose(rates[-1] - (rates[-2] - rates[-1]), 0.0, atol=1e-9)
  vision = {k: v for k, v in _state(stage1)["params"].items() if k.startswith("vision_encoder/")}
  assert vision

  _train("configs/flamingo.py:size=tiny,steps=2", stage2, f"--config.init_from.vision={stage1}")
  frozen = _state(stage2)["frozen"]
  for module, leaves in vision.items():  # frozen in stage 2, exactly as stage 1 left them
    for name, value in leaves.items():
      np.testing.assert_array_equal(
        np.asarray(frozen[module][name], np.float32), np.asarray(value, np.float32)
      )
