"""Flamingo (stage 2) config: frozen LM + frozen vision encoder, trained resampler and xattn blocks.

    python -m flamingo_jax.summary --config configs/flamingo.py:size=80b
    python -m flamingo_jax.train --config configs/flamingo.py:size=tiny --workdir /tmp/flamingo_tiny
    python -m flamingo_jax.train --config configs/flamingo.py:size=smollm2 --workdir runs/main/flamingo \
        --config.init_from.vision=runs/main/contrastive

Arguments: size = tiny | smollm2 | 3b | 9b | 80b (flamingo_jax/models/flamingo.py: SIZES); steps = total
steps (0: the size's default); data = easy_vqa | synthetic | paper (default per size); only = the datasets
of the mixture to keep, '.'-separated (e.g. `only=bursty`: the in-context binding documents alone).
"""

import ml_collections

from configs import common
from flamingo_jax.models import flamingo

# Trainable (paper §2.4): resampler, gated xattn blocks, the new token rows (<image>, <EOC>).
TRAINABLE = (
  r"^perceiver_resampler/",
  r"^lm/gated_xattn/",
  r"^lm/extra_(embed|unembed)/",
)
# Frozen: the vision encoder and the LM's own weights, incl. the original embedding rows.
FROZEN = (
  r"^vision_encoder/",
  r"^lm/(embed|layers|final_norm|unembed)/",
)

# Paper mixture (§2.4, App. B.1.2): lambda, batch, tokens, images per sequence, frames.
PAPER_DATASETS = {
  "m3w": (1.0, 256, 256, 5, 1),
  "align": (0.2, 4096, 32, 1, 1),
  "ltip": (0.2, 1024, 64, 1, 1),
  "vtp": (0.03, 512, 32, 1, 8),
}
# Mesh per size for TPU v4/v5p slices: 'fsdp' shards params/optimizer state, 'tensor' splits heads/MLP.
# 80b: 'fsdp' and 'tensor' must divide the powers-of-two widths, so the factor 3 of the paper's 1536 chips
# goes on 'data' (data=3, fsdp=64, tensor=8 there; `python -m flamingo_jax.plan` checks the memory).
PAPER_MESH = {
  "3b": {"fsdp": -1},
  "9b": {"fsdp": -1, "tensor": 4},
  "80b": {"data": -1, "fsdp": 64, "tensor": 8},
}


def _paper_data(image_size: int) -> dict:
  """User data through the generic JSONL builders (point `sources` at your files, e.g. on gs://)."""
  kinds = {
    "m3w": ("interleaved", "interleaved_jsonl"),
    "align": ("pairs", "image_text_jsonl"),
    "ltip": ("pairs", "image_text_jsonl"),
    "vtp": ("video", "video_text_jsonl"),
  }
  from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

  datasets = {}
  for name, (weight, batch, tokens, images, frames) in PAPER_DATASETS.items():
    kind, builder = kinds[name]
    datasets[name] = mixture.dataset_config(
      kind=kind,
      builder=builder,
      weight=weight,
      batch_size=batch,
      max_tokens=tokens,
      max_images=images,
      num_frames=frames,
      image_size=image_size,
      p_next=0.5 if kind == "interleaved" else 0.0,
      builder_kwargs={"name": name, "sources": {"train": f"gs://YOUR_BUCKET/{name}/train.jsonl"}},
    )
  return dict(
    source="mixture",
    data_dir="gs://YOUR_BUCKET/tfds",
    prepare=False,
    num_parallel_calls=-1,
    prefetch=2,
    datasets=datasets,
  )


def _easy_vqa_data(image_size: int) -> dict:
  from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

  cfg = mixture.easy_vqa_mixture_config(image_size=image_size).to_dict()
  return dict(source="mixture", data_dir="runs/tfds", **cfg)


# The easy-VQA mixture on a 2-core CPU: (lambda, batch) per dataset, ~1100 text tokens per step. VQA pairs
# weigh as much as the documents: they are the one source in the prompt format of the evaluation. The
# bursty binding documents weigh as the paired sets: at 1.0 their noisy gradient cost easy-VQA ~20
# points within 110 steps (docs/EXPERIMENTS.md).
CPU_MIXTURE = {"m3w": (1.0, 4), "pairs": (0.2, 8), "vqa": (1.0, 8), "vtp": (0.03, 4), "bursty": (0.2, 4)}


def _cpu_batches(data: dict) -> None:
  for name, (weight, batch) in CPU_MIXTURE.items():
    data["datasets"][name]["weight"] = weight
    data["datasets"][name]["batch_size"] = batch
  # easy-VQA documents always put the text after its image: attending to the next image (the paper's
  # p_next = 0.5, for web pages) would pair half the texts with the wrong image.
  data["datasets"]["m3w"]["p_next"] = 0.0


def get_config(arg: str = "size=smollm2") -> ml_collections.ConfigDict:
  args = common.parse_args(arg, {"size": "smollm2", "steps": 0, "data": "", "only": ""})
  size = args["size"]
  config = ml_collections.ConfigDict()
  config.objective = "flamingo"
  config.model = flamingo.model_config(size)
  config.trainable = list(TRAINABLE)
  config.frozen = list(FROZEN)
  config.sharding = dict(rules="flamingo")
  config.distributed = common.distributed()
  image_size = config.model.image_size
  paper = size in ("3b", "9b", "80b")
  data = args["data"] or ("paper" if paper else "easy_vqa" if size == "smollm2" else "synthetic")

  if paper:
    config.model.dtype = "bfloat16"
    config.model.remat = "dots"
    config.mesh = dict(shape=PAPER_MESH[size])
    config.optim = common.optim()
    config.train = common.train(args["steps"] or 500_000, log_every=100, checkpoint_every=2000)
    config.tokenizer = "hf:YOUR_LM_DIR/tokenizer.json"
    config.init_from = dict(lm="hf:YOUR_LM_DIR", vision="gs://YOUR_BUCKET/runs/contrastive", flamingo="")
  elif size == "smollm2":
    # The main job on this 2-core CPU (~6 s/step): real frozen SmolLM2-135M, easy-VQA mixture, the small
    # 'nano' NFNet of stage 1 (configs/contrastive.py:size=smollm2). fp32 matmuls: on this AMD CPU XLA's
    # fp32 GEMM beats bf16 (benchmarks/README.md). All layer groups unrolled (~13% faster on XLA:CPU).
    # Resampler 2 x 16 latents: a 64 px image gives the NFNet a 2x2 grid (4 features per frame), and the
    # paper's 6 x 64 would cost more than the LM itself per step here (the 3b/9b/80b sizes keep it).
    config.model.vision_variant = "nano"
    config.model.dtype = "float32"
    config.model.scan_unroll = 8
    config.model.resampler.num_latents = 16
    config.model.resampler.depth = 2
    config.mesh = dict(shape={"data": -1})
    steps = args["steps"] or 110
    # A 110-step run needs the tanh gates to open within tens of steps (paper: 500k steps), so they step
    # 60x faster (3e-2); the resampler steps 5x slower (1e-4), or it learns an image-independent output
    # (its std across images fell 0.38 -> 0.01 in 60 steps at 1e-3; README, main-job results). Base rate
    # 5e-4 with a cosine to 0 (the paper keeps it constant over 500k steps): at 1e-3, constant or
    # cosine, every run had loss spikes (grad norm 250-890) and the last checkpoint could land on one.
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
  else:
    config.mesh = dict(shape={"data": -1})
    config.optim = common.optim(lr=1e-3, warmup_steps=2, total_steps=args["steps"] or 10)
    config.train = common.train(args["steps"] or 10, log_every=1, checkpoint_every=5)
    config.tokenizer = ""
    config.init_from = dict(lm="", vision="", flamingo="")

  if data == "synthetic":
    config.data = common.synthetic_data(
      image_size, m3w=(1.0, 8, 16, 2, 1), pairs=(0.2, 8, 8, 1, 1), vtp=(0.03, 8, 8, 1, 4)
    )
    config.tokenizer = ""
  elif data == "easy_vqa":
    config.data = _easy_vqa_data(image_size)
    if size == "smollm2":
      _cpu_batches(config.data)
  elif data == "paper":
    config.data = _paper_data(image_size)
  else:
    raise KeyError(f"data must be easy_vqa, synthetic or paper; got {data!r}")
  if args["only"]:
    _keep_datasets(config.data, args["only"].split("."))
  return common.finish(config)


def _keep_datasets(data, names: list[str]) -> None:
  """Drops every dataset of the mixture but `names` (an unknown name is an error)."""
  unknown = sorted(set(names) - set(data.datasets))
  if unknown:
    raise KeyError(
      f"only={'.'.join(names)}: {unknown} are not datasets of this config ({sorted(data.datasets)})"
    )
  for name in [n for n in data.datasets if n not in names]:
    del data.datasets[name]
