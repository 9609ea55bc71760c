"""Text generation from Flamingo, or from its frozen LM at initialisation, with a KV cache.

    python -m flamingo_jax.generate --config configs/main_job.py \\
        --prompt "The capital of France is" --max_new_tokens 8
    python -m flamingo_jax.generate --config configs/main_job.py --workdir RUN \\
        --prompt "<image>Question: What shape is this? Answer:" --image shape.png --beam 3

Params: without `--workdir`, Flamingo at initialisation with the LM from `--lm` (default
`config.init_from.lm`) swapped in; its gates are 0, so it computes exactly the LM. With `--workdir`,
the run's latest checkpoint (trainable and frozen params merged). A prompt without images needs only
the `lm/...` params: the vision encoder is neither initialised, restored nor run.

Prompt: plain text with one `<image>` marker per `--image` (PNG/JPEG, resized keeping the aspect
ratio and padded to `config.model.image_size`, RGB in [0, 1]). BOS is prepended for a trained run
(Flamingo's sequences start with it) or when the tokenizer asks for it. Decoding: greedy
(`--beam 0`) or beam search (`--beam K`), through `eval/engine.py: EvalModel` (the inference of the
evaluation too) over the KV cache, jitted once per prompt length; it stops at `<EOC>`, EOS or the document separator. `<image>` is never generated;
at initialisation `<EOC>` is not either (its embedding is untrained). Prints the continuation.
Tokenizer: `config.tokenizer`, else the LM source's own (GGUF metadata, or `DIR/tokenizer.json`).
"""

import dataclasses
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flamingo_jax import pretrained, sources
from flamingo_jax.eval import engine as engine_lib
from flamingo_jax.models import flamingo


@dataclasses.dataclass(frozen=True)
class Generation:
  text: str  # the continuation, without the stop token
  tokens: tuple  # generated ids, without the stop token


def load_images(paths: Sequence[str], size: int) -> np.ndarray | None:
  """float32 [1, N, 1, size, size, 3] in [0, 1] (None for no paths). Raises naming a bad file."""
  if not paths:
    return None
  from flamingo_jax.data import (  # pylint: disable=g-import-not-at-top  (PIL, TensorFlow)
    preprocess,
    render,
    sequence,
  )

  options = preprocess.ImageOptions(size=size)
  out = []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    try:
      out.append(render.load_image(data, missing=False, path=path, options=options))
    except sequence.Dropped as e:
      raise ValueError(f"--image {path}: cannot read it as an image ({e})") from None
  return np.stack(out)[None, :, None]


def encode_prompt(tokenizer, prompt: str, num_images: int, add_bos: bool) -> list[int]:
  """Token ids of the prompt (BOS first if `add_bos`). Raises on a marker/image count mismatch."""
  ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(prompt)
  markers = ids.count(tokenizer.image_id)
  if markers != num_images:
    raise ValueError(
      f"the prompt has {markers} <image> marker(s) but {num_images} image(s) "
      "were given: put one <image> in the prompt per --image"
    )
  if not ids:
    raise ValueError("the prompt is empty")
  return ids


def continue_prompt(
  engine, params, tokenizer, ids: Sequence[int], images, *, max_new_tokens: int
) -> Generation:
  """One prompt's continuation through `eval/engine.py: EvalModel` (the one inference surface).

  ids: the prompt's token ids; images: float32 [1, N, 1, S, S, 3] (`load_images`) or None. Without
  images the gated blocks still run (their dense FFW acts on every token; only the cross-attention
  is zero), so `params` need the `lm/...` modules only.
  """
  max_len = int(engine.model.configs.lm.max_seq_len)
  if len(ids) + max_new_tokens > max_len:
    raise ValueError(
      f"{len(ids)} prompt tokens + {max_new_tokens} new ones exceed config.model.lm.max_seq_len={max_len}"
    )
  num_images = 0 if images is None else images.shape[1]
  (new,) = engine.generate(
    params,
    [list(ids)],
    [list(range(num_images))],
    lambda i: images[0, i],  # [F, S, S, 3]
    prompt_len=len(ids),
    max_new_tokens=max_new_tokens,
  )
  return Generation(text=tokenizer.decode(new), tokens=tuple(new))


def restore_params(model_cfg, workdir: str, text_only: bool) -> dict:
  """The latest checkpoint's params (trainable and frozen merged), or a converted model's
  (`python -m flamingo_jax.convert`), as numpy fp32."""
  from flamingo_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax import init_from  # pylint: disable=g-import-not-at-top

  converted = init_from.is_converted(workdir)
  if not converted and checkpoint_lib.latest_checkpoint_step(workdir) is None:
    raise FileNotFoundError(
      f"--workdir {workdir}: no complete checkpoint under "
      f"{os.path.join(workdir, checkpoint_lib.CHECKPOINTS_DIR)}"
    )
  shapes = pretrained.param_shapes(model_cfg, text_only)
  template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
  kind = "params" if converted else "checkpoint"
  return init_from.load_params_subset(workdir, r"^lm/" if text_only else r".*", template, kind=kind)


def run(
  config,
  *,
  prompt: str,
  image_paths: Sequence[str] = (),
  workdir: str | None = None,
  lm: str | None = None,
  max_new_tokens: int = 32,
  beam: int = 0,
  alpha: float = 0.0,
  seed: int = 0,
) -> Generation:
  """What the command line does, minus the printing (see the module docstring).

  With `workdir`, `lm` only names where the tokenizer comes from when `config.tokenizer` is empty.
  """
  model_cfg = config.model
  lm_spec = lm or config.init_from.lm
  if not workdir and not lm_spec:
    raise ValueError("no params: pass --workdir RUN, or --lm (config.init_from.lm is empty)")
  tokenizer = sources.make_tokenizer(config.tokenizer, lm_spec)
  add_bos = bool(workdir) or tokenizer.add_bos
  encode_prompt(tokenizer, prompt, len(image_paths), add_bos)  # fail before the slow parts
  images = load_images(image_paths, model_cfg.image_size)
  text_only = images is None
  if workdir:
    params = restore_params(model_cfg, workdir, text_only)
    banned = [tokenizer.image_id]
  else:
    params = pretrained.init_flamingo_with_lm(
      model_cfg, lm_spec, jax.random.PRNGKey(seed), text_only=text_only
    )
    banned = [tokenizer.image_id, tokenizer.eoc_id]
  vocab = model_cfg.lm.vocab_size + model_cfg.lm.num_extra_tokens
  if tokenizer.vocab_size != vocab:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} ids, config.model.lm "
      f"{model_cfg.lm.vocab_size} + {model_cfg.lm.num_extra_tokens} extra"
    )
  engine = engine_lib.EvalModel(
    flamingo.make_model(model_cfg),
    tokenizer,
    batch_size=1,
    num_beams=max(beam, 1),
    length_penalty=alpha,
    image_batch_size=max(len(image_paths), 1),
    banned_ids=banned,
  )
  ids = encode_prompt(tokenizer, prompt, len(image_paths), add_bos)
  return continue_prompt(
    engine, jax.device_put(params), tokenizer, ids, images, max_new_tokens=max_new_tokens
  )


def _define_flags() -> dict:
  """The command-line flags (defined only when run as a program: importing defines nothing)."""
  return dict(
    config=config_flags.DEFINE_config_file("config", None, "e.g. configs/main_job.py", lock_config=True),
    workdir=flags.DEFINE_string(
      "workdir", None, "Run to restore (latest checkpoint); default: Flamingo at init == the frozen LM."
    ),
    prompt=flags.DEFINE_string("prompt", None, "Prompt text; one <image> marker per --image."),
    image=flags.DEFINE_multi_string("image", None, "PNG/JPEG file (repeat for several)."),
    max_new_tokens=flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most."),
    beam=flags.DEFINE_integer("beam", 0, "0: greedy; K >= 1: beam search with K beams."),
    alpha=flags.DEFINE_float("alpha", 0.0, "Beam search length penalty exponent."),
    lm=flags.DEFINE_string(
      "lm",
      None,
      "LM source without --workdir: smollm2 | gguf:PATH | "
      "hf:DIR | converted:DIR (default: config.init_from.lm).",
    ),
    seed=flags.DEFINE_integer("seed", 0, "Init seed of the (gated, inactive) Flamingo parts."),
  )


def main():
  f = _define_flags()
  flags.mark_flags_as_required(["config", "prompt"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    out = run(
      f["config"].value,
      prompt=f["prompt"].value,
      image_paths=f["image"].value or (),
      workdir=f["workdir"].value,
      lm=f["lm"].value,
      max_new_tokens=f["max_new_tokens"].value,
      beam=f["beam"].value,
      alpha=f["alpha"].value,
      seed=f["seed"].value,
    )
    print(out.text, flush=True)

  app.run(_main)


if __name__ == "__main__":
  sys.exit(main())
