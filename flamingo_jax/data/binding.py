"""In-context binding of invented names to image classes: word lists, episodes, bursty documents.

Frozen-style fast binding (Tsimpoukelli et al. 2021) on easy-VQA: a class is (shape, colour) by
default ('shape_color'), or the shape or the colour alone. An *episode* of N ways and K shots shows
K support images of each of N classes, each as `<image>This is a {name}.<EOC>`, in shuffled order,
then a query image of one of the N classes with `<image>This is a`; the answer is the name of the
query's class. Names come from a word list (one word per line, `read_word_list`); the training
and the evaluation lists must be disjoint (`check_disjoint`). Episodes are a pure function of
(seed, N, K, index) and the class pool; the controls transform that same episode:
  'none'        the episode as described;
  'text_only'   the same text without images (the evaluator drops them);
  'shuffled'    every support image is shown with the name of another class of the episode (a
                derangement of the names over the classes); the answer stays the query class's own
                name, which the support never pairs with that class;
  'real_names'  the class description ('red circle') in place of the invented name.

Bursty training documents (Chan et al. 2022) draw 2-5 classes from the training images, name them
from the training word list, and interleave 2+ images of each class with their names in one of
`TEMPLATES`. The loss falls only on the names of a class's second and later occurrences: only those
can be known, and only from earlier in the document. A document is a list of `Segment`s whose texts
concatenate to the document text (with `<image>` markers).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import os
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

CLASS_MODES = ("shape_color", "shape", "color")
CONTROLS = ("none", "text_only", "shuffled", "real_names")
IMAGE = "<image>"
EOC = "<EOC>"
# Caption templates of the bursty documents: (text before the name, text after it). The first is
# the evaluation's; a document keeps one template throughout.
TEMPLATES = (
  ("This is a", "."),
  ("Here is a", "."),
  ("Look at this", "!"),
  ("It is a", "."),
  ("This one is a", "."),
  ("We call this a", "."),
)
EVAL_TEMPLATE = TEMPLATES[0]


# ------------------------------------------------------------------------------------ word lists
def default_word_list(which: str) -> str:
  """Path of the packaged 'train' or 'eval' word list."""
  if which not in ("train", "eval"):
    raise ValueError(f"word list must be 'train' or 'eval', got {which!r}")
  return str(importlib.resources.files("flamingo_jax.data") / "wordlists" / f"{which}.txt")


def read_word_list(path: str) -> tuple[str, ...]:
  """The words of a word-list file (one per line; blank lines ignored); errors name the file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"word list {path} does not exist")
  words = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      word = line.strip()
      if not word:
        continue
      if len(word.split()) != 1 or IMAGE in word or EOC in word:
        raise ValueError(f"{path}:{line_no}: a name is one word, got {word!r}")
      words.append(word)
  duplicates = sorted({w for w in words if words.count(w) > 1})
  if duplicates:
    raise ValueError(f"word list {path}: repeated words {duplicates[:10]}")
  if len(words) < 5:
    raise ValueError(f"word list {path}: {len(words)} words; a 5-way episode needs at least 5")
  return tuple(words)


def resolve_word_list(path: str, which: str) -> str:
  """`path`, or the packaged list `which` when `path` is ''."""
  return path or default_word_list(which)


def check_disjoint(
  train: Sequence[str], evaluation: Sequence[str], *, train_path: str = "train", eval_path: str = "eval"
) -> None:
  """Raises naming the shared words when the training and evaluation lists overlap."""
  shared = sorted(set(train) & set(evaluation))
  if shared:
    more = f" (+{len(shared) - 20} more)" if len(shared) > 20 else ""
    raise ValueError(
      f"training names {train_path} and evaluation names {eval_path} share "
      f"{len(shared)} words: {shared[:20]}{more}; held-out names must be new"
    )


# ------------------------------------------------------------------------------------ classes
def class_of(color: str, shape: str, mode: str) -> str:
  """The class of an image, as its description: 'red circle', 'circle' or 'red'."""
  if mode not in CLASS_MODES:
    raise ValueError(f"class mode {mode!r} not in {CLASS_MODES}")
  return {"shape_color": f"{color} {shape}", "shape": shape, "color": color}[mode]


def class_pool(images: Sequence[tuple[str, str, str]], mode: str) -> dict[str, tuple[str, ...]]:
  """{class: image refs in the given order} from (ref, colour, shape) triples."""
  pool: dict[str, list[str]] = {}
  for ref, color, shape in images:
    pool.setdefault(class_of(color, shape, mode), []).append(ref)
  return {c: tuple(refs) for c, refs in sorted(pool.items())}


# ------------------------------------------------------------------------------------ episodes
@dataclasses.dataclass(frozen=True)
class Episode:
  """One N-way K-shot episode. `support[i]` = (image ref, class index); N*K of them, in order."""

  classes: tuple[str, ...]  # [N] class descriptions
  names: tuple[str, ...]  # [N] names[c] is the name of classes[c]
  support: tuple[tuple[str, int], ...]
  shown: tuple[str, ...]  # [N*K] the name shown with each support image
  query: str  # image ref
  query_class: int

  @property
  def answer(self) -> str:
    return self.names[self.query_class]

  def prompt(self) -> tuple[str, tuple[str, ...]]:
    """(prompt text with `<image>` markers, image refs in order); the query's image last."""
    before, after = EVAL_TEMPLATE
    text = "".join(f"{IMAGE}{before} {name}{after}{EOC}" for name in self.shown)
    return text + f"{IMAGE}{before}", tuple(ref for ref, _ in self.support) + (self.query,)


def _rng(*keys) -> np.random.Generator:
  return np.random.default_rng([zlib.crc32(repr(keys).encode())])


def _keyed_order(refs: Sequence[str], *keys) -> list[str]:
  """`refs` ordered by a hash of (keys, ref). A ref's place does not depend on which other refs
  exist, so a source image dropped from a pool changes only the documents that would show it."""
  return sorted(refs, key=lambda ref: zlib.crc32(repr((*keys, ref)).encode()))


def make_episode(
  pool: Mapping[str, Sequence[str]],
  names: Sequence[str],
  *,
  n_way: int,
  k_shot: int,
  seed: int,
  index: int,
  control: str = "none",
) -> Episode:
  """Episode `index` of seed `seed` (deterministic; the controls share the classes and images)."""
  if control not in CONTROLS:
    raise ValueError(f"control {control!r} not in {CONTROLS}")
  eligible = sorted(c for c, refs in pool.items() if len(refs) > k_shot)
  if n_way < 2 or len(eligible) < n_way or len(names) < n_way:
    raise ValueError(
      f"{n_way}-way {k_shot}-shot needs >= 2 ways, {n_way} classes with more than "
      f"{k_shot} images and {n_way} names; have {len(eligible)} classes, "
      f"{len(names)} names"
    )
  rng = _rng(seed, n_way, k_shot, index)
  classes = tuple(eligible[i] for i in rng.choice(len(eligible), n_way, replace=False))
  picked = tuple(names[i] for i in rng.choice(len(names), n_way, replace=False))
  query_class = int(rng.integers(n_way))
  support, query = [], None
  for c, cls in enumerate(classes):
    refs = pool[cls]
    chosen = rng.choice(len(refs), k_shot + (c == query_class), replace=False)
    support += [(refs[i], c) for i in chosen[:k_shot]]
    if c == query_class:
      query = refs[chosen[k_shot]]
  order = rng.permutation(len(support))
  support = tuple(support[i] for i in order)
  # A random derangement (a cyclic shift of a random order), drawn for every control so that all
  # controls share the episode above.
  cycle, step = rng.permutation(n_way), 1 + int(rng.integers(n_way - 1))
  shift = {int(cycle[i]): int(cycle[(i + step) % n_way]) for i in range(n_way)}
  if control == "real_names":
    picked = classes
  if control == "shuffled":
    shown = tuple(picked[shift[c]] for _, c in support)
  else:
    shown = tuple(picked[c] for _, c in support)
  return Episode(
    classes=classes, names=tuple(picked), support=support, shown=shown, query=query, query_class=query_class
  )


# ------------------------------------------------------------------------------------ documents
@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of a document's text; `loss` marks its tokens as targets."""

  text: str
  loss: bool = False


def bursty_document(
  pool: Mapping[str, Sequence[str]],
  names: Sequence[str],
  *,
  key,
  max_images: int,
  min_classes: int = 2,
  max_classes: int = 5,
) -> tuple[list[Segment], list[str]]:
  """(segments, image refs) of bursty training document `key` (deterministic)."""
  rng = _rng("bursty", key)
  classes = sorted(pool)
  n = int(rng.integers(min_classes, min(max_classes, max_images // 2, len(classes)) + 1))
  chosen = [classes[i] for i in rng.choice(len(classes), n, replace=False)]
  picked = [names[i] for i in rng.choice(len(names), n, replace=False)]
  total = int(rng.integers(2 * n, max_images + 1))
  counts = np.full(n, 2) + np.bincount(rng.integers(n, size=total - 2 * n), minlength=n)
  order = rng.permutation(np.repeat(np.arange(n), counts))
  before, after = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
  # Distinct images of a class unless its pool is smaller than its count (then they repeat).
  images = {c: itertools.cycle(_keyed_order(pool[chosen[c]], "bursty", key)[: counts[c]]) for c in range(n)}
  segments, refs, seen = [], [], set()
  for c in order.tolist():
    refs.append(next(images[c]))
    segments += [Segment(f"{IMAGE}{before}"), Segment(f" {picked[c]}", loss=c in seen), Segment(after)]
    seen.add(c)
  return segments, refs


def document_text(segments: Sequence[Segment]) -> str:
  return "".join(s.text for s in segments)
