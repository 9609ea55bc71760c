"""Few-shot evaluation data: support pool (train split), queries (test split), media loaders.

Sources: the embedded easy-VQA (TFDS builder `easy_vqa`: configs `vqa`, `captions` for captioning
and colour/shape classification, `video` with any number of frames) and users' JSONL files:
  VQA:      {"image": "a.jpg", "question": "...", "answers": ["...", ...]}
  captions: {"image": "a.jpg", "captions": ["...", ...]}
(image paths relative to the JSONL file's folder unless absolute or URLs). Media are referenced by
strings ('train/123' for easy-VQA, the resolved path for JSONL) and decoded on demand
(`render.load_image`, eval mode: no augmentation) as float32 [F,S,S,3] in [0,1].
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence

import numpy as np

from flamingo_jax.data import preprocess, render
from flamingo_jax.data.sequence import as_text
from flamingo_jax.eval import prompting


class FewShotData:
  """Support pool (train split), queries (test split) and a media loader (ref -> [F,S,S,3] f32).

  `references[q]`: VQA answers / reference captions / the label of query q. Media refs are
  strings (RICES caches them as ids).
  """

  def __init__(
    self,
    name: str,
    support: Sequence[prompting.Example],
    queries: Sequence[prompting.Example],
    references: Sequence[Sequence[str]],
    load: Callable[[str], np.ndarray],
    candidates: Sequence[str] = (),
  ):
    if not support or not queries:
      raise ValueError(f"{name}: needs support examples and queries, got {len(support)} and {len(queries)}")
    self.name, self.support, self.queries = name, list(support), list(queries)
    self.references, self.load = [tuple(r) for r in references], load
    self.candidates = tuple(candidates)
    self.by_media: dict[str, list[int]] = {}
    for i, e in enumerate(self.support):
      self.by_media.setdefault(e.image, []).append(i)
    self.support_media = list(self.by_media)

  def subset(self, num_queries: int) -> FewShotData:
    """The same data with a fixed random sample (seed 0, original order) of the queries."""
    if num_queries < 0 or num_queries >= len(self.queries):
      return self
    keep = sorted(random.Random(0).sample(range(len(self.queries)), num_queries))
    return FewShotData(
      self.name,
      self.support,
      [self.queries[i] for i in keep],
      [self.references[i] for i in keep],
      self.load,
      self.candidates,
    )


def _loader(options: preprocess.ImageOptions, read: Callable[[str], list[tuple[bytes, str]]]):
  """ref -> [F,S,S,3] float32 from `read(ref)` = [(encoded bytes, path), ...] (one per frame)."""

  def load(ref: str) -> np.ndarray:
    return np.stack(
      [render.load_image(data, missing=not data, path=path, options=options) for data, path in read(ref)]
    )

  return load


def _easy_vqa_builder(data_dir: str, **kwargs):
  """The prepared easy_vqa builder (built into data_dir on first use, offline)."""
  from flamingo_jax.data import builders  # pylint: disable=g-import-not-at-top  (TFDS is heavy)

  return builders.prepare(builders.make_builder("easy_vqa", data_dir, **kwargs))


def easy_vqa_data(
  kind: str,
  data_dir: str,
  image_size: int,
  *,
  attribute: str = "color",
  num_frames: int = 8,
  max_examples: int | None = None,
) -> FewShotData:
  """easy-VQA as VQA (kind 'vqa'), captioning ('captions'), colour/shape classification
  ('classification', `attribute`) or video captioning ('video', `num_frames` per clip)."""
  options = preprocess.ImageOptions(size=image_size)
  builder_kind = {"classification": "captions"}.get(kind, kind)
  kw = dict(kind=builder_kind, max_examples=max_examples)
  if kind == "video":
    kw["num_frames"] = num_frames
  builder = _easy_vqa_builder(data_dir, **kw)
  sources = {s: builder.as_data_source(s) for s in ("train", "test")}
  where, split_examples = {}, {}
  for split, source in sources.items():
    examples, refs = [], []
    for start in range(0, len(source), 4096):
      for index, r in enumerate(
        source.__getitems__(range(start, min(start + 4096, len(source)))), start=start
      ):
        ref = f"{split}/{int(r['image_id'])}"
        where.setdefault(ref, (split, index))
        if kind == "vqa":
          answer = as_text(r["answer"])
          examples.append(prompting.Example(image=ref, question=as_text(r["question"]), answers=(answer,)))
          refs.append((answer,))
        elif kind == "classification":
          examples.append(prompting.Example(image=ref, label=as_text(r[attribute])))
          refs.append((examples[-1].label,))
        else:
          examples.append(prompting.Example(image=ref, caption=as_text(r["text"])))
          refs.append((examples[-1].caption,))
    split_examples[split] = (examples, refs)

  def read(ref):
    split, index = where[ref]
    r = sources[split][index]
    if kind == "video":
      return [(f, as_text(p)) for f, p in zip(r["frames"], r["frame_paths"])]
    return [(r["image"], as_text(r["image_path"]))]

  from flamingo_jax.data.builders import easy_vqa_facts  # pylint: disable=g-import-not-at-top

  candidates = {"color": tuple(easy_vqa_facts.COLORS), "shape": easy_vqa_facts.SHAPES}
  name = {"classification": f"easy_vqa_{attribute}"}.get(kind, f"easy_vqa_{kind}")
  return FewShotData(
    name,
    split_examples["train"][0],
    *split_examples["test"],
    load=_loader(options, read),
    candidates=candidates[attribute] if kind == "classification" else (),
  )


def _read_jsonl(path: str, kind: str) -> tuple[list[prompting.Example], list[tuple[str, ...]]]:
  from etils import epath  # pylint: disable=g-import-not-at-top

  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{kind} JSONL file {path} does not exist")
  examples, refs = [], []
  for line_no, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path}:{line_no}"
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    field = "answers" if kind == "vqa" else "captions"
    needed = ("image", "question", field) if kind == "vqa" else ("image", field)
    missing = [k for k in needed if k not in r]
    if missing or not isinstance(r.get(field), list) or not r[field]:
      raise ValueError(
        f"{where}: needs the fields {needed} with a non-empty list {field!r}; missing {missing}"
      )
    image = (
      r["image"] if ("://" in r["image"] or r["image"].startswith("/")) else str(path.parent / r["image"])
    )
    if kind == "vqa":
      # The most frequent answer is shown when the example is in the prompt.
      answers = sorted(r[field], key=lambda a, c=r[field]: -c.count(a))
      examples.append(prompting.Example(image=image, question=r["question"], answers=tuple(answers)))
    else:
      examples.append(prompting.Example(image=image, caption=r[field][0]))
    refs.append(tuple(r[field]))
  return examples, refs


def jsonl_data(kind: str, support: str, queries: str, image_size: int) -> FewShotData:
  """Users' VQA (`{"image", "question", "answers"}`) or caption (`{"image", "captions"}`) JSONL."""
  if not support or not queries:
    raise ValueError(
      f"jsonl_{kind}: set task_options.jsonl_{kind}.support and .queries (got {support!r}, {queries!r})"
    )
  from etils import epath  # pylint: disable=g-import-not-at-top

  def read(ref):
    try:
      return [(epath.Path(ref).read_bytes(), ref)]
    except OSError:
      return [(b"", ref)]  # load_image raises Dropped('missing_image') naming the path

  pool, _ = _read_jsonl(support, kind)
  return FewShotData(
    f"jsonl_{kind}",
    pool,
    *_read_jsonl(queries, kind),
    load=_loader(preprocess.ImageOptions(size=image_size), read),
  )


BLANK = ""  # the media ref of a padding slot: loads as a black image that no token attends to


def easy_vqa_images(data_dir: str, image_size: int, split: str = "test", max_examples: int | None = None):
  """([(ref, colour, shape)] of the split's images, loader ref -> [1,S,S,3] f32; BLANK -> zeros)."""
  builder = _easy_vqa_builder(data_dir, kind="captions", max_examples=max_examples)
  source = builder.as_data_source(split)
  records = source.__getitems__(range(len(source)))
  images = [(f"{split}/{int(r['image_id'])}", as_text(r["color"]), as_text(r["shape"])) for r in records]
  index = {ref: i for i, (ref, _, _) in enumerate(images)}
  load = _loader(
    preprocess.ImageOptions(size=image_size),
    lambda ref: [(records[index[ref]]["image"], as_text(records[index[ref]]["image_path"]))],
  )
  blank = np.zeros([1, image_size, image_size, 3], np.float32)
  return images, lambda ref: blank if ref == BLANK else load(ref)
