"""Image-text pairs (ALIGN/LTIP-like; also VQA as text): one example -> arrays of a batch row.

Shapes: T max_tokens, S image side; pairs have N=1 media of F=1 frame.

The sequence is `<BOS><image>{text}<EOC><EOS>` (the paper's paired-data format), where text is
`text_template` filled with the example's text fields (e.g. '{text}' or
'Question: {question} Answer: {answer}'), stripped, and in training preceded by a space with
p=0.5 (keyed by the example's rng). A text that does not fit in T+1 ids is dropped ('text_too_long')
rather than cut, so that `<EOC>` always ends the real caption.

`loss_from` (a template field, e.g. 'answer'; '' = everything): the loss covers only the text from that
field on, plus `<EOC>`/`<EOS>` (VQA-style supervision: the question is given, the answer is predicted).
It needs the ids of the text before the field to be a prefix of the whole text's ids; where the
tokenizer merges across the boundary, the example keeps the full loss.
"""

import string
from collections.abc import Mapping
from typing import Any

import numpy as np

from flamingo_jax.data import preprocess, sequence
from flamingo_jax.data.sequence import Dropped


def fill_template(example: Mapping[str, Any], template: str, where: str) -> str:
  """`template` filled with the example's text fields (bytes decoded as UTF-8), stripped."""
  names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
  missing = sorted(n for n in names if not isinstance(example.get(n), (bytes, str)))
  if missing:
    fields = sorted(k for k, v in example.items() if isinstance(v, (bytes, str)))
    raise KeyError(
      f"{where}: text_template {template!r} needs field {missing[0]!r}; the example has {fields}"
    )
  # Only the template's fields are decoded: the others include the encoded image.
  return template.format(**{n: sequence.as_text(example[n]) for n in names}).strip()


def prompt_length(
  example: Mapping[str, Any],
  template: str,
  field: str,
  tokenizer,
  *,
  leading_space: bool,
  text_ids: list[int],
  where: str,
) -> int:
  """Number of leading ids of `text_ids` that come before `{field}` of the template (0 if unsure)."""
  marker = "{" + field + "}"
  if marker not in template:
    raise KeyError(f"{where}: loss_from {field!r} is not a field of text_template {template!r}")
  prefix = fill_template(example, template[: template.index(marker)], where)
  if not prefix:
    return 0
  ids = tokenizer.encode((" " if leading_space else "") + prefix)
  return len(ids) if text_ids[: len(ids)] == ids and len(ids) < len(text_ids) else 0


def caption_sequence(text: str, tokenizer, *, leading_space: bool, max_tokens: int, where: str) -> list[int]:
  """`[BOS, <image>, *text ids, EOC, EOS]`, checked to fit T+1 ids and to hold no `<image>`."""
  if not text:
    raise Dropped("empty_text", where)
  ids = tokenizer.encode((" " if leading_space else "") + text)
  if tokenizer.image_id in ids:
    raise Dropped("image_count_mismatch", f"{where}: the text holds an <image> marker")
  seq = [tokenizer.bos_id, tokenizer.image_id, *ids, tokenizer.eoc_id, tokenizer.eos_id]
  if len(seq) > max_tokens + 1:
    raise Dropped("text_too_long", f"{where}: {len(seq)} ids > {max_tokens + 1}")
  return seq


def process_pair(
  example: Mapping[str, Any],
  rng: np.random.Generator | None,
  *,
  tokenizer,
  image_options: preprocess.ImageOptions,
  max_tokens: int,
  text_template: str = "{text}",
  p_next: float = 0.0,
  loss_from: str = "",
  **unused,
) -> tuple[dict[str, np.ndarray], int]:
  """One pair -> ({planned images [1,1] (`preprocess.plan_arrays`), media_mask [1], text arrays [T]},
  notes); rng None = eval.

  Raises Dropped for a bad example.
  """
  del unused  # the fields of other kinds (max_images, num_frames)
  path = sequence.as_text(example.get("image_path", b"?"))
  text = fill_template(example, text_template, path)
  leading_space = rng is not None and rng.random() < 0.5
  seq = caption_sequence(text, tokenizer, leading_space=leading_space, max_tokens=max_tokens, where=path)
  augment = preprocess.Augment.draw(rng, image_options) if rng is not None else None
  plan = preprocess.plan_image(
    example["image"],
    missing=bool(example["image_missing"]),
    path=path,
    options=image_options,
    augment=augment,
  )
  attend_next = rng is not None and p_next > 0 and rng.random() < p_next
  arrays = sequence.text_arrays(
    seq, max_tokens=max_tokens, pad_id=tokenizer.pad_id, image_id=tokenizer.image_id, attend_next=attend_next
  )
  if loss_from:
    # seq = [BOS, <image>, *text ids, ...]: target j is seq[j + 1], so the prompt's P ids are the
    # targets 1..P (target 0, <image>, never has a loss).
    length = prompt_length(
      example,
      text_template,
      loss_from,
      tokenizer,
      leading_space=leading_space,
      text_ids=seq[2:-2],
      where=path,
    )
    arrays["loss_mask"][: 1 + length] = 0.0
  return {**preprocess.plan_arrays([[plan]]), "media_mask": np.ones([1], bool), **arrays}, 0
