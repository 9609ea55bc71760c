"""Config sections shared by the contrastive and Flamingo stages (each a function returning a dict)."""

import ml_collections


def parse_args(arg: str, allowed: dict) -> dict:
  """'a=1,b=x' -> dict, with defaults from `allowed`; an unknown key raises (no silent typos)."""
  args = dict(allowed)
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in allowed:
      raise KeyError(f"Unknown config argument {item!r}; expected key=value with keys {sorted(allowed)}")
    args[key] = (
      type(allowed[key])(value) if not isinstance(allowed[key], bool) else value in ("1", "true", "True")
    )
  return args


def optim(
  lr=1e-4,
  warmup_steps=5000,
  total_steps=500_000,
  weight_decay=0.1,
  no_decay=(r"^perceiver_resampler/",),
  grad_clip_norm=1.0,
  grad_clip_on=(".*",),
  agc_clip=0.0,
  agc_on=(r"^vision_encoder/",),
  lr_multipliers=(),
  decay="constant",
  kind="adamw",
) -> dict:
  """The paper's AdamW: warm-up then constant; decay 0.1 except the resampler; clip 1.0.

  lr_multipliers: [(regex over 'module/param', factor)], a per-parameter step scale (none in the paper).
  decay: the rate after warm-up, 'constant' (the paper's stage 2), 'cosine' or 'linear' (to 0 at
    `total_steps`; 'linear' is the paper's stage 1).
  kind: 'adamw' (decoupled weight decay) or 'adam' (weight decay as L2 in the gradient).
  grad_clip_on: the params whose global norm is clipped (regexes; default all).
  """
  return dict(
    kind=kind,
    lr=lr,
    warmup_steps=warmup_steps,
    decay=decay,
    total_steps=total_steps,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=weight_decay,
    no_decay=list(no_decay),
    grad_clip_norm=grad_clip_norm,
    grad_clip_on=list(grad_clip_on),
    agc_clip=agc_clip,
    agc_on=list(agc_on),
    lr_multipliers=[list(m) for m in lr_multipliers],
  )


def train(
  total_steps: int, log_every=50, checkpoint_every=1000, keep_checkpoints=3, seed=0, micro_batches=None
) -> dict:
  """`train` section. checkpoint_fallback: resume from the next newest checkpoint when the newest
  does not read (it is moved to WORKDIR/checkpoints_corrupt/); False makes that an error.
  dataset_schedule: 'accumulate' (every step sees every dataset, the paper) or 'round_robin' (one
  dataset per step, in turn: the paper's ablation)."""
  return dict(
    total_steps=total_steps,
    dataset_schedule="accumulate",
    log_every=log_every,
    checkpoint_every=checkpoint_every,
    keep_checkpoints=keep_checkpoints,
    checkpoint_fallback=True,
    seed=seed,
    max_consecutive_skips=10,
    micro_batches=dict(micro_batches or {}),
    peak_tflops=0.0,  # per device, for the logged MFU; 0: the device kind's datasheet figure
  )


def synthetic_data(image_size: int, **datasets) -> dict:
  """`data` section with synthetic batches: datasets as name=(weight, batch, tokens, images, frames)."""
  return dict(
    source="synthetic",
    data_dir="",
    datasets={
      name: dict(weight=w, batch_size=b, max_tokens=t, max_images=n, num_frames=f, image_size=image_size)
      for name, (w, b, t, n, f) in datasets.items()
    },
  )


def distributed() -> dict:
  """Multi-host set-up; unset fields are auto-detected by `jax.distributed.initialize` (TPU VMs)."""
  placeholder = ml_collections.config_dict.placeholder
  return dict(
    enabled=False,
    coordinator_address=placeholder(str),
    num_processes=placeholder(int),
    process_id=placeholder(int),
  )


def finish(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Declares a training config's `train.micro_batches` for every dataset (1 where it names none); locks.

  A name in `train.micro_batches` that is not a dataset of `data.datasets` is an error; after this,
  `--config.train.micro_batches.<typo>=2` is one too (the config is locked).
  """
  if "train" in config:  # a training config (evaluation configs only lock)
    datasets = sorted(config.data.datasets)
    named = dict(config.train.micro_batches)
    unknown = sorted(set(named) - set(datasets))
    if unknown:
      raise KeyError(
        f"train.micro_batches names {unknown}, which are not datasets of data.datasets {datasets}"
      )
    config.train.micro_batches = {name: int(named.get(name, 1)) for name in datasets}
  config.lock()
  return config
