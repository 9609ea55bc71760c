"""The paper's ablations (Table 3) as one change each to the CPU main job's stage 2 (configs/main_job.py).

    python -m flamingo_jax.train --config configs/ablations.py:name=tanh_off --workdir runs/abl/tanh_off \
        --config.data.data_dir=runs/main/tfds --config.init_from.vision=runs/main/contrastive
    python -m flamingo_jax.evaluate --config configs/fewshot_eval.py:quick=True --workdir runs/abl/tanh_off \
        --config.data_dir=runs/main/tfds

Arguments: name = one of ABLATIONS; steps = total steps (0: the main job's). Each row of Table 3 and
its reported direction (the paper's overall score, baseline 70.7):
  baseline             the main job itself
  tanh_off             xattn output added ungated                        (paper: 66.5, lower)
  round_robin          one dataset per step, in turn                      (paper: 62.9, lower)
  all_previous_images  a token cross-attends to every image up to phi     (paper: 63.5, lower)
  xattn_every_2        a gated xattn block before every 2nd LM layer      (paper, every 2nd/4th: lower)
  xattn_every_8        ... every 8th
  p_next_half          interleaved documents: text attends to the next image with p = 0.5
  lm_unfrozen          the LM's layers train too                          (paper, fine-tuned: lower)
  resampler_mlp        a plain MLP over the visual features, not the Perceiver (paper: 66.6, lower)
  resampler_transformer  a plain transformer over them                    (paper: 66.7, lower)
"""

import ml_collections

from configs import common, main_job

ABLATIONS = (
  "baseline",
  "tanh_off",
  "round_robin",
  "all_previous_images",
  "xattn_every_2",
  "xattn_every_8",
  "p_next_half",
  "lm_unfrozen",
  "resampler_mlp",
  "resampler_transformer",
)


def get_config(arg: str = "name=baseline") -> ml_collections.ConfigDict:
  """The main job's stage 2 with the ablation `name` applied."""
  args = common.parse_args(arg, {"name": "baseline", "steps": 0})
  name = args["name"]
  if name not in ABLATIONS:
    raise KeyError(f"name must be one of {ABLATIONS}, got {name!r}")
  config = main_job.get_config(f"steps={args['steps']}" if args["steps"] else "")
  if name == "tanh_off":
    config.model.xattn.gating = "none"
  elif name == "round_robin":
    config.train.dataset_schedule = "round_robin"
  elif name == "all_previous_images":
    config.model.xattn.media_attention = "all_previous"
  elif name.startswith("xattn_every_"):
    config.model.xattn.every = int(name.rsplit("_", 1)[1])
  elif name == "p_next_half":
    config.data.datasets.m3w.p_next = 0.5
  elif name.startswith("resampler_"):
    config.model.resampler.kind = name.split("_", 1)[1]
  elif name == "lm_unfrozen":
    lm = r"^lm/(embed|layers|final_norm|unembed)/"
    config.trainable = list(config.trainable) + [lm]
    config.frozen = [p for p in config.frozen if p != lm]
  return config
