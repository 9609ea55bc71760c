"""The CPU main job's stage 2: Flamingo over the frozen SmolLM2-135M-Instruct on the easy-VQA mixture.

    python -m flamingo_jax.train --config configs/main_job.py --workdir runs/main/flamingo \
        --config.init_from.vision=runs/main/contrastive

`bash launch/local.sh` runs it after stage 1 (configs/contrastive.py:size=smollm2), on a 2-core CPU in
about 15 minutes. Arguments: steps = total steps (0: 110); only = the datasets of the mixture to keep,
'.'-separated (e.g. `only=bursty`: the in-context binding documents alone).
"""

import ml_collections

from configs import common
from configs import flamingo as flamingo_config

# The easy-VQA mixture on a 2-core CPU: (lambda, batch) per dataset, ~1100 text tokens per step. VQA pairs
# weigh as much as the documents: they are the one source in the prompt format of the evaluation. The
# bursty binding documents weigh as the paired sets: at 1.0 their noisy gradient cost easy-VQA ~20
# points within 110 steps (docs/EXPERIMENTS.md).
CPU_MIXTURE = {"m3w": (1.0, 4), "pairs": (0.2, 8), "vqa": (1.0, 8), "vtp": (0.03, 4), "bursty": (0.2, 4)}


def _cpu_batches(data: dict) -> None:
  """Each dataset's (lambda, batch) of CPU_MIXTURE; text after its image, so no p_next."""
  for name, (weight, batch) in CPU_MIXTURE.items():
    data["datasets"][name]["weight"] = weight
    data["datasets"][name]["batch_size"] = batch
  # easy-VQA documents always put the text after its image: attending to the next image (the paper's
  # p_next = 0.5, for web pages) would pair half the texts with the wrong image.
  data["datasets"]["m3w"]["p_next"] = 0.0


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The main job's stage-2 config."""
  args = common.parse_args(arg, {"steps": 0, "only": ""})
  config = flamingo_config.base("smollm2")
  # Real frozen SmolLM2-135M, the small 'nano' NFNet of stage 1 (configs/contrastive.py:size=smollm2).
  # fp32 matmuls: on the AVX2 AMD CPU of benchmarks/README.md XLA's fp32 GEMM beats bf16. All layer
  # groups unrolled (~13% faster on XLA:CPU). Resampler 2 x 16 latents: a 64 px image gives the NFNet a
  # 2x2 grid (4 features per frame), and the paper's 6 x 64 would cost more than the LM itself per step.
  config.model.vision_variant = "nano"
  config.model.dtype = "float32"
  config.model.scan_unroll = 8
  config.model.resampler.num_latents = 16
  config.model.resampler.depth = 2
  config.mesh = dict(shape={"data": -1})
  steps = args["steps"] or 110
  # 110 steps need the tanh gates to open within tens of steps (paper: 500k steps), so they step 60x
  # faster (3e-2); the resampler steps 5x slower (1e-4), or it learns an image-independent output. Base
  # rate 5e-4 with a cosine to 0: at 1e-3 every run had loss spikes (docs/EXPERIMENTS.md).
  config.optim = common.optim(
    lr=5e-4,
    warmup_steps=10,
    total_steps=steps,
    decay="cosine",
    lr_multipliers=[(r"_gate$", 60.0), (r"^perceiver_resampler/", 0.2)],
  )
  config.train = common.train(steps, log_every=10, checkpoint_every=50)
  config.tokenizer = "smollm2"
  config.init_from = dict(lm="smollm2", vision="", flamingo="")
  config.data = flamingo_config.easy_vqa_data(config.model.image_size)
  _cpu_batches(config.data)
  flamingo_config.keep_datasets(config.data, args["only"])
  return common.finish(config)
