"""Stage 1: contrastive pretraining of the NFNet vision encoder with a BERT-style text tower (App. B.1.3).

    python -m flamingo_jax.train --config configs/contrastive.py:size=tiny --workdir /tmp/contrastive_tiny
    python -m flamingo_jax.train --config configs/contrastive.py:size=smollm2 --workdir runs/main/contrastive

Its `vision_encoder/...` params are then restored, frozen, into Flamingo via
`--config.init_from.vision=<this workdir>` of configs/flamingo.py.
Arguments: size = tiny | smollm2 (the CPU main job: NFNet 'nano', easy-VQA captions) | f6 (the paper: NFNet-F6,
ALIGN + LTIP pairs); steps = total steps (0: default); recipe = paper (App. B.1.3: Adam, linear decay to 0,
AGC on the NFNet, a global-norm clip of 10 on the text encoder, the two softmax terms summed; f6's default)
| small (AdamW at a constant rate after warm-up, AGC only, the terms averaged; tiny's and smollm2's default).
"""

import ml_collections

from configs import common
from configs import flamingo as flamingo_config

_TEXT = {
  "tiny": dict(vocab_size=66, dim=32, num_layers=2, num_heads=2, max_len=32),
  "smollm2": dict(vocab_size=49154, dim=256, num_layers=4, num_heads=4, max_len=64),
  "f6": dict(vocab_size=32002, dim=768, num_layers=12, num_heads=12, max_len=64),  # BERT-base-like
}
_VISION = {"tiny": ("test", 32), "smollm2": ("nano", 64), "f6": ("F6", 288)}
RECIPES = ("paper", "small")


def get_config(arg: str = "size=smollm2") -> ml_collections.ConfigDict:
  """The stage-1 config for `arg`. Long: a flat list of fields, read top to bottom."""
  args = common.parse_args(arg, {"size": "smollm2", "steps": 0, "recipe": ""})
  size = args["size"]
  if size not in _TEXT:
    raise KeyError(f"size must be one of {sorted(_TEXT)}, got {size!r}")
  recipe = args["recipe"] or ("paper" if size == "f6" else "small")
  if recipe not in RECIPES:
    raise KeyError(f"recipe must be one of {RECIPES}, got {recipe!r}")
  variant, image_size = _VISION[size]
  config = ml_collections.ConfigDict()
  config.objective = "contrastive"
  config.model = dict(
    size=size,
    vision_variant=variant,
    image_size=image_size,
    # The paper's F6 model: a shared embedding of 1376 and the two softmax terms summed (Eq. 3);
    # the small recipe averages the terms (the CPU job's AGC threshold was tuned with that scale).
    embed_dim={"tiny": 16, "smollm2": 256, "f6": 1376}[size],
    text=_TEXT[size],
    dtype="float32",
    label_smoothing=0.1,
    loss_terms="sum" if recipe == "paper" else "mean",
    lm=dict(vocab_size=_TEXT[size]["vocab_size"] - 2, num_extra_tokens=2),
  )
  config.trainable = [r".*"]  # everything trains in stage 1
  config.frozen = [r"^$"]
  config.sharding = dict(rules="contrastive")
  config.distributed = common.distributed()
  config.mesh = dict(shape={"data": -1})
  # (total steps, warm-up steps, log every, checkpoint every) of each size.
  steps, warmup, log_every, checkpoint_every = {
    "f6": (args["steps"] or 1_200_000, 5000, 100, 5000),
    "smollm2": (args["steps"] or 150, 20, 10, 50),
    "tiny": (args["steps"] or 4, 1, 1, 2),
  }[size]
  config.optim = _optim(recipe, steps, warmup, weight_decay=0.0 if size == "tiny" else 1e-5)
  config.train = common.train(steps, log_every=log_every, checkpoint_every=checkpoint_every)
  if size == "f6":
    config.tokenizer = "hf:YOUR_TOKENIZER/tokenizer.json"
    config.data = _pairs_data(image_size, batch=4096, source="paper")
  elif size == "smollm2":
    config.tokenizer = "smollm2"
    config.data = _pairs_data(image_size, batch=32, source="easy_vqa")
  else:
    config.tokenizer = ""
    config.data = common.synthetic_data(image_size, pairs=(1.0, 8, 8, 1, 1))
  config.init_from = dict(lm="", vision="", flamingo="")
  return common.finish(config)


def _optim(recipe: str, steps: int, warmup: int, weight_decay: float) -> dict:
  """Stage 1's optimizer. Both recipes: AGC 1e-2 on the NFNet, no weight decay on the temperature."""
  if recipe == "paper":
    # App. B.1.3: plain Adam (L2 in the gradient), the rate decayed linearly to 0, and a global-norm
    # clip of 10 on the text encoder alone.
    return common.optim(
      kind="adam",
      lr=1e-3,
      warmup_steps=warmup,
      total_steps=steps,
      decay="linear",
      weight_decay=weight_decay,
      no_decay=(r"logit_scale",),
      agc_clip=0.01,
      grad_clip_norm=10.0,
      grad_clip_on=(r"^text_encoder/",),
    )
  return common.optim(
    lr=1e-3,
    warmup_steps=warmup,
    total_steps=steps,
    weight_decay=weight_decay,
    no_decay=(r"logit_scale",),
    agc_clip=0.01,
    grad_clip_norm=0.0,
  )


def _pairs_data(image_size: int, batch: int, source: str) -> dict:
  from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

  if source == "easy_vqa":
    pairs = mixture.dataset_config(
      kind="pairs",
      builder_kwargs={"kind": "captions", "max_examples": None},
      weight=1.0,
      batch_size=batch,
      max_tokens=16,
      image_size=image_size,
    )
    return dict(
      source="mixture",
      data_dir="runs/tfds",
      prepare=True,
      num_parallel_calls=-1,
      prefetch=2,
      datasets={"pairs": pairs},
    )
  datasets = {
    name: mixture.dataset_config(
      kind="pairs",
      builder="image_text_webdataset",
      weight=1.0,
      batch_size=b,
      max_tokens=64,
      image_size=image_size,
      builder_kwargs={"name": name, "sources": {"train": f"gs://YOUR_BUCKET/{name}/*.tar"}},
      **flamingo_config.PAPER_IMAGE_OPTIONS["pairs"],
    )
    for name, b in (("align", batch), ("ltip", batch // 4))
  }
  return dict(
    source="mixture",
    data_dir="gs://YOUR_BUCKET/tfds",
    prepare=False,
    num_parallel_calls=-1,
    prefetch=2,
    datasets=datasets,
  )
