"""Metrics out: JSONL and TensorBoard event files in the workdir, written by process 0 only."""

import json
import os

import jax
import numpy as np


class MetricsWriter:
  """`write(step, {name: scalar})` appends to `workdir/metrics.jsonl` and TensorBoard `workdir/tb/`."""

  def __init__(self, workdir: str, prefix: str = "train"):
    self.enabled = jax.process_index() == 0
    self.prefix = prefix
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      # Open for the writer's lifetime (closed in close()), not one write.
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # TensorBoard output is optional; JSONL is always written.
        self._tb = None

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {f"{self.prefix}/{k}": float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
