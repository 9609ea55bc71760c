"""The public Flamingo-family models (OpenFlamingo, IDEFICS): their shapes, and fine-tuning a converted
checkpoint (docs/PRETRAINED.md).

    python -m flamingo_jax.summary --config configs/pretrained.py:name=idefics-80b
    python -m flamingo_jax.plan --config configs/pretrained.py:name=idefics-80b --devices 256 --hbm_gib 95
    python -m flamingo_jax.train --config configs/pretrained.py:dir=runs/idefics-9b --workdir RUN

Arguments:
  name   a preset of `flamingo_jax/models/public.py` (openflamingo-3b, openflamingo-9b, idefics-9b,
         idefics-80b): the real shapes, bf16, an FSDP (+ tensor) mesh; init_from points at
         YOUR_CONVERTED_DIR.
  dir    a directory written by `python -m flamingo_jax.convert` (open_flamingo: / idefics:): its
         model, its tokenizer, and every part of `init_from` from it (the LM and the vision encoder
         stay frozen, the resampler, the blocks and the new token rows continue training).
  data   easy_vqa (default) | synthetic | paper;  steps  total steps (default 1000; 10 with synthetic).
"""

import json
import os

import ml_collections

from configs import common
from configs import flamingo as flamingo_config
from flamingo_jax.models import public

# Presets on TPU slices: 'fsdp' shards params and optimizer state; 'tensor' splits heads and MLPs
# where one chip cannot hold a layer group's activations (`python -m flamingo_jax.plan` checks).
PRESET_MESH = {
  "openflamingo-3b": {"fsdp": -1},
  "openflamingo-9b": {"fsdp": -1},
  "idefics-9b": {"fsdp": -1},
  "idefics-80b": {"data": -1, "fsdp": 32, "tensor": 8},
}

# Micro-batches per dataset (gradient accumulation) with the paper's mixture: IDEFICS-80B on a v5p-512
# (256 chips of 95 GiB) then peaks at 48 GiB per chip instead of 108 (`plan`, docs/PRETRAINED.md).
PRESET_MICRO_BATCHES = {"idefics-80b": {"align": 4, "ltip": 2, "m3w": 2}}


def converted_run_config(directory: str) -> dict:
  """DIR/config.json of a converted checkpoint (its `model` and `tokenizer` sections)."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: dir= names a `python -m flamingo_jax.convert` output")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def get_config(arg: str = "name=idefics-9b") -> ml_collections.ConfigDict:
  """The fine-tuning config for `arg` (a preset name or a converted directory)."""
  args = common.parse_args(arg, {"name": "", "dir": "", "data": "easy_vqa", "steps": 0})
  name, directory = args["name"], args["dir"]
  if bool(name) == bool(directory):
    raise KeyError(f"pass exactly one of name= (one of {sorted(public.SIZES)}) or dir=")
  if name and name not in public.SIZES:
    raise KeyError(f"name={name!r}: expected one of {sorted(public.SIZES)}")
  config = flamingo_config.base(name or "tiny")
  if directory:
    directory = os.path.abspath(directory)
    converted = converted_run_config(directory)
    config.model = ml_collections.ConfigDict(converted["model"])
    config.tokenizer = converted["tokenizer"]
    config.init_from = dict(lm=f"converted:{directory}", vision=directory, flamingo=directory)
    config.mesh = dict(shape={"data": -1})
  else:
    config.model.dtype = "bfloat16"
    config.model.remat = "dots"
    config.model.lm.attention = config.model.xattn.attention = "fused"  # as configs/flamingo.py
    config.loss_chunk = 64
    config.tokenizer = "hf:YOUR_CONVERTED_DIR/tokenizer.json"
    config.init_from = dict(
      lm="converted:YOUR_CONVERTED_DIR", vision="YOUR_CONVERTED_DIR", flamingo="YOUR_CONVERTED_DIR"
    )
    config.mesh = dict(shape=PRESET_MESH[name])
  image_size = config.model.image_size
  if args["data"] == "easy_vqa":
    config.data = flamingo_config.easy_vqa_data(image_size)
  elif args["data"] == "synthetic":
    config.data = common.synthetic_data(image_size, pairs=(1.0, 8, 16, 1, 1))
    config.tokenizer = ""  # synthetic token ids need none
  elif args["data"] == "paper":
    config.data = flamingo_config._paper_data(image_size)  # pylint: disable=protected-access
  else:
    raise KeyError(f"data must be easy_vqa, synthetic or paper; got {args['data']!r}")
  steps = args["steps"] or (10 if args["data"] == "synthetic" else 1000)
  # Fine-tuning a trained model: a tenth of the paper's peak rate, with its warm-up and cosine decay.
  config.optim = common.optim(lr=1e-5, warmup_steps=min(100, steps // 10), total_steps=steps, decay="cosine")
  micro_batches = PRESET_MICRO_BATCHES.get(name, {}) if args["data"] == "paper" else {}
  config.train = common.train(
    steps,
    log_every=max(1, min(100, steps // 10)),
    checkpoint_every=max(1, steps // 4),
    micro_batches=micro_batches,
  )
  return common.finish(config)
