"""Flamingo few-shot prompts (paper App. B.1.5).

Every example is rendered by its task's template and the examples are concatenated:
  VQA:            <image>Question: {question} Answer: {answer}<EOC>
  captioning:     <image>Output: {caption}<EOC>
  classification: <image>Output: {label}<EOC>
The query uses the same template with its answer left open ("<image>Question: ... Answer:"), so the
model continues with " {answer}<EOC>" (`continuation` gives that text for scoring candidates).

Support order: `shuffle_seed=None` keeps the given order (RICES: the caller passes the most similar
example last); an int shuffles a copy with `random.Random(seed)` (random selection).
Zero-shot (paper): two text-only support examples, i.e. their `<image>` removed and no image used.

The text holds no BOS: the caller prepends the tokenizer's `bos_id`. `image_refs` lists the image of
each `<image>` of the text, in order (support images, then the query's).

`FORMATS` holds each model family's own prompts (`config.prompt_format`): the paper's above;
OpenFlamingo's evaluation prompts (`<image>Question:{q} Short answer:{a}<|endofchunk|>`, whose
`<|endofchunk|>` is the converted model's `<EOC>` row); IDEFICS's (each image written as its processor
writes it, `<fake_token_around_image><image><fake_token_around_image>`, the fake token being the
converted model's `<EOC>` row; an example ends with a newline).
"""

from __future__ import annotations

import dataclasses
import random
import types
from collections.abc import Hashable, Sequence

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<EOC>"
TASKS = ("vqa", "captioning", "classification")


@dataclasses.dataclass(frozen=True)
class Example:
  """One evaluation example. `image` is an id or reference the caller resolves to pixels.

  For VQA, `answers[0]` is the answer shown when the example is a support example (put the most
  frequent answer first); all `answers` are used by the metric.
  """

  image: Hashable
  question: str | None = None
  answers: tuple[str, ...] = ()
  caption: str | None = None
  label: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """`example` renders a support example (fields: question, answer, caption, label); `query` renders
  the query with the answer left open (the example's beginning); `separator` goes between consecutive
  examples. Both start with `<image>`, written into the text as `image_block`; an example ends with
  `end`."""

  example: str
  query: str
  separator: str = ""
  image_block: str = IMAGE_TOKEN
  end: str = EOC_TOKEN

  def __post_init__(self):
    for name in ("example", "query"):
      text = getattr(self, name)
      if not text.startswith(IMAGE_TOKEN):
        raise ValueError(f"PromptTemplate.{name} must start with {IMAGE_TOKEN!r}, got {text!r}")
    if not self.example.endswith(self.end):
      raise ValueError(f"PromptTemplate.example must end with {self.end!r}, got {self.example!r}")
    if self.image_block.count(IMAGE_TOKEN) != 1:
      raise ValueError(f"PromptTemplate.image_block must hold one {IMAGE_TOKEN!r}, got {self.image_block!r}")

  def write(self, text: str, with_image: bool = True) -> str:
    """A rendered example or query with its leading `<image>` as `image_block` (or dropped)."""
    return (self.image_block if with_image else "") + text[len(IMAGE_TOKEN) :]


DEFAULT_TEMPLATES = types.MappingProxyType(
  {
    "vqa": PromptTemplate(
      example="<image>Question: {question} Answer: {answer}<EOC>", query="<image>Question: {question} Answer:"
    ),
    "captioning": PromptTemplate(example="<image>Output: {caption}<EOC>", query="<image>Output:"),
    "classification": PromptTemplate(example="<image>Output: {label}<EOC>", query="<image>Output:"),
  }
)


_IDEFICS_IMAGE = EOC_TOKEN + IMAGE_TOKEN + EOC_TOKEN
FORMATS = types.MappingProxyType(
  {
    "flamingo": DEFAULT_TEMPLATES,
    "open_flamingo": types.MappingProxyType(
      {
        "vqa": PromptTemplate(
          example="<image>Question:{question} Short answer:{answer}<EOC>",
          query="<image>Question:{question} Short answer:",
        ),
        "captioning": PromptTemplate(example="<image>Output:{caption}<EOC>", query="<image>Output:"),
        "classification": PromptTemplate(
          example="<image>A photo of a {label}<EOC>", query="<image>A photo of a"
        ),
      }
    ),
    "idefics": types.MappingProxyType(
      {
        "vqa": PromptTemplate(
          example="<image>Question: {question} Answer: {answer}\n",
          query="<image>Question: {question} Answer:",
          image_block=_IDEFICS_IMAGE,
          end="\n",
        ),
        "captioning": PromptTemplate(
          example="<image>Caption: {caption}\n", query="<image>Caption:", image_block=_IDEFICS_IMAGE, end="\n"
        ),
        "classification": PromptTemplate(
          example="<image>Category: {label}\n", query="<image>Category:", image_block=_IDEFICS_IMAGE, end="\n"
        ),
      }
    ),
  }
)


def template_for(task: str, prompt_format: str = "flamingo") -> PromptTemplate:
  """The `prompt_format` family's template of `task`."""
  if prompt_format not in FORMATS:
    raise ValueError(f"Unknown prompt format {prompt_format!r}; expected one of {sorted(FORMATS)}")
  if task not in FORMATS[prompt_format]:
    raise ValueError(f"Unknown prompt task {task!r}; expected one of {TASKS} or pass a template")
  return FORMATS[prompt_format][task]


def _template(task: str, template: PromptTemplate | None) -> PromptTemplate:
  return template if template is not None else template_for(task)


def target_text(example: Example, task: str) -> str:
  """The answer an example shows when it is a support example (VQA: `answers[0]`)."""
  if task == "vqa":
    if not example.answers:
      raise ValueError(f"VQA support example for image {example.image!r} has no answers")
    return example.answers[0]
  field = {"captioning": "caption", "classification": "label"}.get(task)
  if field is None:
    raise ValueError(f"Unknown prompt task {task!r}; expected one of {TASKS}")
  value = getattr(example, field)
  if value is None:
    raise ValueError(f"{task} support example for image {example.image!r} has no {field}")
  return value


def _fields(example: Example, answer: str | None) -> dict[str, str | None]:
  return {"question": example.question, "answer": answer, "caption": answer, "label": answer}


def render_example(
  example: Example, task: str, *, template: PromptTemplate | None = None, with_image: bool = True
) -> str:
  """A support example with its answer: e.g. "<image>Question: q Answer: a<EOC>"."""
  tmpl = _template(task, template)
  return tmpl.write(tmpl.example.format(**_fields(example, target_text(example, task))), with_image)


def render_query(example: Example, task: str, *, template: PromptTemplate | None = None) -> str:
  """The query with its answer left open: e.g. "<image>Question: q Answer:"."""
  if task == "vqa" and example.question is None:
    raise ValueError(f"VQA query for image {example.image!r} has no question")
  tmpl = _template(task, template)
  return tmpl.write(tmpl.query.format(**_fields(example, None)))


def continuation(answer: str, task: str = "classification", template: PromptTemplate | None = None) -> str:
  """What the model should write after the open query for `answer`: the example's text after the
  query's, e.g. " {answer}<EOC>" (OpenFlamingo's VQA: "{answer}<EOC>", no space)."""
  tmpl = _template(task, template)
  fields = {"question": "", "answer": answer, "caption": answer, "label": answer}
  return tmpl.example.format(**fields)[len(tmpl.query.format(**fields)) :]


def build_prompt(
  support: Sequence[Example],
  query: Example,
  task: str,
  *,
  template: PromptTemplate | None = None,
  shuffle_seed: int | None = None,
  text_only_support: bool = False,
) -> tuple[str, list[Hashable]]:
  """The few-shot prompt text and the images of its `<image>` markers.

  Args:
    support: the in-context examples (RICES: most similar last).
    query: the example to answer; its answer fields are not used.
    task: "vqa", "captioning" or "classification" (picks the default template).
    template: overrides the task's default template.
    shuffle_seed: None keeps the support order; an int shuffles it with this seed.
    text_only_support: zero-shot mode: support examples lose their `<image>` and their image.

  Returns:
    (text, image_refs): text without BOS; image_refs[i] is the image of the i-th `<image>` in text.
  """
  tmpl = _template(task, template)
  support = list(support)
  if shuffle_seed is not None:
    random.Random(shuffle_seed).shuffle(support)
  parts, image_refs = [], []
  for example in support:
    parts.append(render_example(example, task, template=tmpl, with_image=not text_only_support))
    if not text_only_support:
      image_refs.append(example.image)
  parts.append(render_query(query, task, template=tmpl))
  image_refs.append(query.image)
  text = tmpl.separator.join(parts)
  if text.count(IMAGE_TOKEN) != len(image_refs):
    raise ValueError(
      f"Prompt has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} markers but "
      f"{len(image_refs)} images; does a question or answer contain "
      f"{IMAGE_TOKEN!r}? Prompt: {text!r}"
    )
  return text, image_refs


def permuted_prompts(
  support: Sequence[Example],
  query: Example,
  task: str,
  num_prompts: int,
  *,
  seed: int = 0,
  template: PromptTemplate | None = None,
) -> list[tuple[str, list[Hashable]]]:
  """Prompts for prompt ensembling: the given order, then `num_prompts - 1` shuffled orders."""
  if num_prompts < 1:
    raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
  prompts = [build_prompt(support, query, task, template=template)]
  for i in range(1, num_prompts):
    prompts.append(build_prompt(support, query, task, template=template, shuffle_seed=seed + i))
  return prompts


# Text-only examples of a zero-shot prompt (paper App. B.1.5): two for open-ended tasks, which show
# the answer format; none for close-ended ones, whose candidates fix the format.
ZERO_SHOT_EXAMPLES = {"vqa": 2, "captioning": 2, "classification": 0}


def zero_shot_prompt(
  text_examples: Sequence[Example], query: Example, task: str, *, template: PromptTemplate | None = None
) -> tuple[str, list[Hashable]]:
  """Zero-shot prompt as in the paper: `ZERO_SHOT_EXAMPLES[task]` text-only examples, then the query."""
  want = ZERO_SHOT_EXAMPLES[task]
  if len(text_examples) != want:
    raise ValueError(
      f"Zero-shot {task} prompts use exactly {want} text-only examples, got {len(text_examples)}"
    )
  return build_prompt(text_examples, query, task, template=template, text_only_support=True)


def random_support(
  pool: Sequence[Example], k: int, seed: int, *, exclude: Hashable | None = None
) -> list[Example]:
  """`k` examples drawn without replacement from `pool` (never one whose image is `exclude`)."""
  candidates = [e for e in pool if exclude is None or e.image != exclude]
  if k > len(candidates):
    raise ValueError(f"Asked for {k} support examples but the pool has only {len(candidates)}")
  return random.Random(seed).sample(candidates, k)
