"""Synthetic Flamingo batches: a deterministic function of (seed, step, dataset), no files.

For benchmarks, smoke runs and loop tests where the model, not the data, is under test. Same batch format
and `Mixture`-like interface (`__next__`, `get_state`, `set_state`, `metrics`, `weights`) as
`flamingo_jax/data/mixture.py`. Each dataset config needs: weight, batch_size (global), max_tokens,
max_images, num_frames, image_size; plus `vocab_size` and `image_id` from the model.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from flamingo_jax.models import masking


def synthetic_batch(
  rng: np.random.Generator,
  *,
  batch_size: int,
  max_tokens: int,
  max_images: int,
  num_frames: int,
  image_size: int,
  vocab_size: int,
  image_id: int,
  eoc_id: int,
) -> dict:
  """One batch: `max_images` chunks of `<image> text... <EOC>`, the last two tokens padded on odd rows."""
  b, t, n = batch_size, max_tokens, max_images
  tokens = rng.integers(0, vocab_size, size=(b, t + 1)).astype(np.int32)
  chunk = max((t + 1) // n, 2)
  for i in range(n):
    start = i * chunk
    if start < t + 1:
      tokens[:, start] = image_id
    if start + chunk - 1 < t + 1:
      tokens[:, start + chunk - 1] = eoc_id
  valid = np.ones((b, t + 1), bool)
  valid[1::2, -2:] = False
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  token_mask = valid[:, :-1]
  loss_mask = (valid[:, 1:] & token_mask & (targets != image_id)).astype(np.float32)
  media_index = masking.media_index_from_tokens(inputs, image_id)
  images = rng.uniform(size=(b, n, num_frames, image_size, image_size, 3)).astype(np.float32)
  return dict(
    images=images,
    media_mask=np.ones((b, n), bool),
    tokens=inputs,
    targets=targets,
    loss_mask=loss_mask,
    media_index=media_index,
    token_mask=token_mask,
  )


class SyntheticMixture:
  """`{name: host batch}` per step; host p of P gets rows [p B/P, (p+1) B/P) of each global batch."""

  def __init__(
    self,
    datasets: Mapping[str, Any],
    *,
    vocab_size: int,
    image_id: int,
    eoc_id: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ):
    self.datasets = {name: dict(cfg) for name, cfg in datasets.items()}
    self.weights = {name: float(cfg["weight"]) for name, cfg in self.datasets.items()}
    self.vocab_size, self.image_id, self.eoc_id = vocab_size, image_id, eoc_id
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = {}
    for i, (name, cfg) in enumerate(sorted(self.datasets.items())):
      rng = np.random.default_rng([self.seed, self.step, i])
      full = synthetic_batch(
        rng,
        batch_size=cfg["batch_size"],
        max_tokens=cfg["max_tokens"],
        max_images=cfg["max_images"],
        num_frames=cfg["num_frames"],
        image_size=cfg["image_size"],
        vocab_size=self.vocab_size,
        image_id=self.image_id,
        eoc_id=self.eoc_id,
      )
      per_host = cfg["batch_size"] // self.process_count
      rows = slice(self.process_index * per_host, (self.process_index + 1) * per_host)
      out[name] = {k: v[rows] for k, v in full.items()}
    self.step += 1
    return out

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"data state has seed {state['seed']}, this mixture {self.seed}")
    self.step = int(state["step"])

  def metrics(self) -> dict:
    return {name: {} for name in self.datasets}
