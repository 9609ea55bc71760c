"""Flamingo (stage 2) at the paper's sizes, and `tiny` for tests.

    python -m flamingo_jax.summary --config configs/flamingo.py:size=80b
    python -m flamingo_jax.plan --config configs/flamingo.py:size=80b --devices 1536 --hbm_gib 32
    python -m flamingo_jax.train --config configs/flamingo.py:size=3b --workdir gs://YOUR_BUCKET/runs/3b
    python -m flamingo_jax.train --config configs/flamingo.py:size=tiny --workdir /tmp/flamingo_tiny

Arguments: size = 3b | 9b | 80b (the paper's mixture through the JSONL builders, bf16, TPU meshes) | tiny
(the tiny model of the tests); steps = total steps (0: the size's default); data = paper | synthetic |
easy_vqa (default: paper for the paper sizes, synthetic for tiny); only = the datasets of the mixture to
keep, '.'-separated. The CPU main job (SmolLM2-135M on easy-VQA) is configs/main_job.py.
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


# App. A.3: images under 64 px or with an aspect ratio above 3 are dropped (video frames are not
# filtered: the paper says it of images), and images are padded with their dataset's mean colour.
PAPER_IMAGE_OPTIONS = {
  "interleaved": dict(min_image_side=64, max_aspect_ratio=3.0, pad_with_mean=True),
  "pairs": dict(min_image_side=64, max_aspect_ratio=3.0, pad_with_mean=True),
  "video": dict(min_image_side=0, max_aspect_ratio=0.0, pad_with_mean=True),
}


# The layouts the open substitutes ship in (docs/DATA.md), each built on Apache Beam: M3W -> OBELICS-style
# parquet, ALIGN / LTIP -> img2dataset webdataset shards (LAION, COYO, ...), VTP -> mp4 + caption
# table. (kind, builder, file pattern); point `sources.train` at your files, or switch a dataset to the
# JSONL builders (`builder=interleaved_jsonl`, ...).
PAPER_SOURCES = {
  "m3w": ("interleaved", "interleaved_parquet", "*.parquet"),
  "align": ("pairs", "image_text_webdataset", "*.tar"),
  "ltip": ("pairs", "image_text_webdataset", "*.tar"),
  "vtp": ("video", "video_text_mp4", "*.csv"),
}


def _paper_data(image_size: int) -> dict:
  """The paper's mixture over users' web-scale files (`PAPER_SOURCES`), prepared beforehand
  (`python -m flamingo_jax.data.prepare`)."""
  from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

  datasets = {}
  for name, (weight, batch, tokens, images, frames) in PAPER_DATASETS.items():
    kind, builder, pattern = PAPER_SOURCES[name]
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
      builder_kwargs={"name": name, "sources": {"train": f"gs://YOUR_BUCKET/{name}/{pattern}"}},
      **PAPER_IMAGE_OPTIONS[kind],
    )
  return dict(
    source="mixture",
    data_dir="gs://YOUR_BUCKET/tfds",
    prepare=False,
    num_parallel_calls=-1,
    prefetch=2,
    datasets=datasets,
  )


def easy_vqa_data(image_size: int) -> dict:
  """The easy-VQA mixture (`data/mixture.py`), built offline from the `easy-vqa` package."""
  from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

  cfg = mixture.easy_vqa_mixture_config(image_size=image_size).to_dict()
  return dict(source="mixture", data_dir="runs/tfds", **cfg)


def base(size: str) -> ml_collections.ConfigDict:
  """What every stage-2 config shares: the objective, the model of `size`, freezing and sharding rules."""
  config = ml_collections.ConfigDict()
  config.objective = "flamingo"
  # Eq. 2 sums each sequence's NLL (the paper sizes); a per-token mean keeps a short-text dataset's
  # weight in the mixture at its lambda (the CPU main job and tiny).
  config.loss_normalisation = "per_token_mean"
  # > 0: the loss forms the [B, T, V+E] logits this many positions at a time (objectives.chunked_token_nll);
  # 0 forms them at once, the fastest on a CPU with small batches.
  config.loss_chunk = 0
  config.model = flamingo.model_config(size)
  config.trainable = list(TRAINABLE)
  config.frozen = list(FROZEN)
  config.sharding = dict(rules="flamingo")
  config.distributed = common.distributed()
  return config


def get_config(arg: str = "size=3b") -> ml_collections.ConfigDict:
  """The stage-2 config for `arg`."""
  args = common.parse_args(arg, {"size": "3b", "steps": 0, "data": "", "only": ""})
  size = args["size"]
  paper = size in PAPER_MESH
  if not paper and size != "tiny":
    raise KeyError(
      f"size must be one of {sorted(PAPER_MESH)} or tiny (the CPU main job: configs/main_job.py)"
    )
  config = base(size)
  image_size = config.model.image_size
  if paper:
    config.loss_normalisation = "per_sequence_sum"
    # 32k-49k vocabularies: [B, 256, V] fp32 logits and their gradient would outgrow the activations.
    config.loss_chunk = 64
    config.model.dtype = "bfloat16"
    config.model.remat = "dots"
    # jax.nn.dot_product_attention: cuDNN's flash attention when lowered for CUDA, XLA's elsewhere.
    config.model.lm.attention = config.model.xattn.attention = "fused"
    config.mesh = dict(shape=PAPER_MESH[size])
    config.optim = common.optim()
    config.train = common.train(args["steps"] or 500_000, log_every=100, checkpoint_every=2000)
    config.tokenizer = "hf:YOUR_LM_DIR/tokenizer.json"
    config.init_from = dict(lm="hf:YOUR_LM_DIR", vision="gs://YOUR_BUCKET/runs/contrastive", flamingo="")
  else:
    config.mesh = dict(shape={"data": -1})
    config.optim = common.optim(lr=1e-3, warmup_steps=2, total_steps=args["steps"] or 10)
    config.train = common.train(args["steps"] or 10, log_every=1, checkpoint_every=5)
    config.tokenizer = ""
    config.init_from = dict(lm="", vision="", flamingo="")

  data = args["data"] or ("paper" if paper else "synthetic")
  if data == "synthetic":
    config.data = common.synthetic_data(
      image_size, m3w=(1.0, 8, 16, 2, 1), pairs=(0.2, 8, 8, 1, 1), vtp=(0.03, 8, 8, 1, 4)
    )
    config.tokenizer = ""
  elif data == "easy_vqa":
    config.data = easy_vqa_data(image_size)
  elif data == "paper":
    config.data = _paper_data(image_size)
  else:
    raise KeyError(f"data must be easy_vqa, synthetic or paper; got {data!r}")
  keep_datasets(config.data, args["only"])
  return common.finish(config)


def keep_datasets(data, only: str) -> None:
  """Drops every dataset of the mixture but those of `only` ('.'-separated; '' keeps all; an unknown
  name is an error)."""
  if not only:
    return
  names = only.split(".")
  unknown = sorted(set(names) - set(data.datasets))
  if unknown:
    raise KeyError(
      f"only={'.'.join(names)}: {unknown} are not datasets of this config ({sorted(data.datasets)})"
    )
  for name in [n for n in data.datasets if n not in names]:
    del data.datasets[name]
