"""Few-shot evaluators (big_vision style): small classes whose `run` yields (metric_name, value).

    model = engine.EvalModel(flamingo.make_model(cfg), tokenizer, batch_size=32, num_beams=3)
    ev = make_evaluator('easy_vqa', fewshot_eval_config, image_size=64)
    metrics = dict(ev.run(model, params, tokenizer, shots=4, selection='rices', seed=0,
                          rices_dir='RUN/eval/rices_cache', model_id='step300'))
    ev.predictions   # one JSON-able record per query of that run

Support examples come from the train split, queries from the test split (a fixed sample of
`num_queries`, the same for every seed; `eval/fewshot_data.py`). Random selection draws each
query's support with (seed, query); RICES (`rices.py`) ranks the *distinct* support media by
pooled frozen-vision features (`model.vision_features`; video: the middle frame), most similar
last, never the query's own medium, and the seed picks which example of a chosen medium is shown
(VQA: one of its questions). Zero-shot uses two text-only random support examples (paper).
Open-ended tasks decode with beam search over the KV cache (`eval/engine.py`) and stop at `<EOC>`;
close-ended tasks rank the answer set by log-likelihood, averaged over `num_prompts` orders of the
support (prompt ensembling).

Prompts are left-padded to a multiple of `prompt_bucket`, kept for later runs with the same shots
while their prompts fit, so decoding compiles about once per (shots, max_new_tokens, lm_only).
`lm_only=True` runs the same prompts through the frozen LM (no cross-attention, no images: the
text-only baseline), by default as plain text (`<image>` dropped, `<EOC>` -> newline, which also
stops decoding). Accumulated statistics are merged across hosts (`_merge_hosts`); CIDEr needs every
caption, so captioning runs all queries on every host.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from flamingo_jax.eval import engine, fewshot_data, prompting
from flamingo_jax.eval import rices as rices_lib
from flamingo_jax.eval.metrics import cider as cider_lib
from flamingo_jax.eval.metrics import vqa as vqa_lib


# ------------------------------------------------------------------------------------ evaluators
def sum_over_hosts(values: np.ndarray) -> np.ndarray:
  """The element-wise sum of `values` (this host's sufficient statistics) over all hosts."""
  values = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(values), np.float64).sum(0)


def _merge_hosts(acc: vqa_lib.VQAAccumulator) -> vqa_lib.VQAAccumulator:
  """An accumulator holding the sum of every host's statistics (sums, never per-host means)."""
  stats = acc.stats()
  total, count = sum_over_hosts(np.asarray([stats["sum"], stats["count"]]))
  return vqa_lib.VQAAccumulator().merge([{"sum": total, "count": count}])


def plain_text(text: str, template: prompting.PromptTemplate | None = None) -> str:
  """A prompt as a text-only LM reads it: images (`template.image_block`) dropped, `<EOC>` -> newline."""
  block = template.image_block if template is not None else prompting.IMAGE_TOKEN
  return text.replace(block, "").replace(prompting.EOC_TOKEN, "\n")


def _seed(seed: int, query: int) -> int:
  return int(seed) * 1_000_003 + int(query)


def _middle_frame(load):
  return lambda ref: (lambda x: x[x.shape[0] // 2])(load(ref))


class Evaluator:
  """Base class: support selection, prompts and host sharding; subclasses score the queries.

  After `run`, `predictions` holds one JSON-able record per query of this host.
  """

  task = "vqa"  # prompting template
  metric = "accuracy"
  shard_queries = True  # False: every host runs every query (metrics needing all predictions)

  def __init__(
    self,
    data: fewshot_data.FewShotData,
    *,
    max_new_tokens: int = 8,
    prompt_bucket: int = 32,
    num_prompts: int = 1,
    text_only_format: str = "lm",
    prompt_format: str = "flamingo",
  ):
    """`prompt_format`: the model family's prompts (`prompting.FORMATS`)."""
    if text_only_format not in ("lm", "flamingo"):
      raise ValueError(f"text_only_format must be 'lm' or 'flamingo', got {text_only_format!r}")
    self.template = prompting.template_for(self.task, prompt_format)
    self.data, self.max_new_tokens = data, int(max_new_tokens)
    self.text_only_format = text_only_format
    self.prompt_bucket, self.num_prompts = int(prompt_bucket), int(num_prompts)
    self.predictions: list[dict[str, Any]] = []
    self._rices_key, self._rices, self._query_feats = None, None, None
    self._prompt_len: dict[tuple[int, bool], int] = {}  # (shots, plain) -> padded length T

  def run(
    self,
    model: engine.EvalModel,
    params,
    tokenizer,
    *,
    shots: int,
    selection: str = "random",
    seed: int = 0,
    lm_only: bool = False,
    rices_dir: str | None = None,
    model_id: str = "init",
  ) -> Iterator[tuple[str, float]]:
    """Evaluates one (shots, selection, seed) setting; yields (metric name, value).

    `lm_only`: the frozen LM alone (no cross-attention, no images); with text_only_format 'lm'
    the prompts are also rewritten as plain text (`plain_text`), as that LM reads them.

    Long: one evaluation protocol (prompts, decoding, metrics) read in order.
    """
    if selection not in ("random", "rices"):
      raise ValueError(f"selection must be 'random' or 'rices', got {selection!r}")
    count = len(self.data.queries)
    queries = (
      list(range(jax.process_index(), count, jax.process_count()))
      if self.shard_queries
      else list(range(count))
    )
    supports = self._select(model, params, queries, shots, selection, seed, rices_dir, model_id)
    prompts = []
    for q, support in zip(queries, supports):
      query = self.data.queries[q]
      if shots == 0:
        prompts.append([prompting.zero_shot_prompt(support, query, self.task, template=self.template)])
      else:
        prompts.append(
          prompting.permuted_prompts(
            support, query, self.task, self.num_prompts, seed=_seed(seed, q), template=self.template
          )
        )
    plain = lm_only and self.text_only_format == "lm"
    if plain:
      prompts = [[(plain_text(t, self.template), m) for t, m in p] for p in prompts]
    ids = [[[tokenizer.bos_id] + tokenizer.encode(text) for text, _ in p] for p in prompts]
    # Sticky per shots: a later seed reuses the padded length when its prompts fit (no recompile).
    needed = max(len(i) for p in ids for i in p)
    if self._prompt_len.get((shots, plain), 0) < needed:
      self._prompt_len[shots, plain] = engine.bucket(needed, self.prompt_bucket)
    self.predictions = []
    outputs = self._outputs(
      model,
      params,
      tokenizer,
      ids,
      [[m for _, m in p] for p in prompts],
      prompt_len=self._prompt_len[shots, plain],
      lm_only=lm_only,
      plain=plain,
    )
    for q, support, p, out in zip(queries, supports, prompts, outputs):
      self.predictions.append(
        dict(
          query=q,
          image=str(self.data.queries[q].image),
          question=self.data.queries[q].question,
          references=list(self.data.references[q]),
          support=[str(e.image) for e in support],
          prompt=p[0][0],
          **out,
        )
      )
    yield from self._metrics()

  def _select(self, model, params, queries, shots, selection, seed, rices_dir, model_id):
    """Each query's support examples (RICES: most similar last)."""
    d = self.data
    if shots == 0 or selection == "random":
      k = prompting.ZERO_SHOT_EXAMPLES[self.task] if shots == 0 else shots
      return [
        prompting.random_support(d.support, k, _seed(seed, q), exclude=d.queries[q].image) for q in queries
      ]
    rices = self._rices_for(model, params, rices_dir, model_id)
    ranked = rices.select(
      self._query_feats[queries], shots, exclude_ids=[d.queries[q].image for q in queries]
    )
    media = [str(m) for m in rices.support()[0]]  # the ids of the (cached) feature rows
    out = []
    for q, row in zip(queries, ranked):
      rng = random.Random(_seed(seed, q))
      out.append([d.support[rng.choice(d.by_media[media[j]])] for j in row])
    return out

  def _rices_for(self, model, params, rices_dir, model_id) -> rices_lib.RICES:
    if rices_dir is None:
      raise ValueError(f"{self.data.name}: RICES selection needs rices_dir (its feature cache)")
    if self._rices_key != (rices_dir, str(model_id)):
      d, still = self.data, _middle_frame(self.data.load)
      self._rices = rices_lib.RICES(
        lambda: (np.asarray(d.support_media), model.features(params, d.support_media, still)),
        rices_dir,
        model_id=model_id,
        dataset=d.name,
        split="train",
        count=len(d.support_media),
      )
      media = [q.image for q in d.queries]
      distinct = list(dict.fromkeys(media))
      feats = model.features(params, distinct, still)
      self._query_feats = feats[[distinct.index(m) for m in media]]
      self._rices_key = (rices_dir, str(model_id))
    return self._rices

  def _outputs(self, model, params, tokenizer, ids, media, *, prompt_len, lm_only, plain):
    """One dict per query: at least {'prediction': str}."""
    newline = tokenizer.encode("\n") if plain or self.template.end == "\n" else []
    texts = model.generate(
      params,
      [i[0] for i in ids],
      [m[0] for m in media],
      self.data.load,
      prompt_len=prompt_len,
      max_new_tokens=self.max_new_tokens,
      lm_only=lm_only,
      extra_stop_ids=newline if len(newline) == 1 else (),
    )
    return [dict(prediction=vqa_lib.postprocess_generation(tokenizer.decode(t))) for t in texts]

  def _metrics(self) -> Iterator[tuple[str, float]]:
    acc = vqa_lib.VQAAccumulator()
    for record in self.predictions:
      record["accuracy"] = acc.add(record["prediction"], record["references"])
    acc = _merge_hosts(acc)
    yield self.metric, 100.0 * acc.result()
    yield "num_queries", float(acc.stats()["count"])


class VQAEvaluator(Evaluator):
  """Open-ended VQA: beam search, VQA accuracy with the official normalisation (percent)."""


class CaptionEvaluator(Evaluator):
  """Captioning (images or video clips): beam search, CIDEr-D x 100 (paper units)."""

  task, metric, shard_queries = "captioning", "cider", False

  def _metrics(self):
    preds = {r["query"]: r["prediction"] for r in self.predictions}
    score, per_query = cider_lib.cider_d(preds, {r["query"]: r["references"] for r in self.predictions})
    for r in self.predictions:
      r["cider"] = 100.0 * per_query[r["query"]]
    yield self.metric, 100.0 * score
    yield "num_queries", float(len(preds))


class ClassificationEvaluator(Evaluator):
  """Close-ended: rank the answer set by log-likelihood, averaged over `num_prompts` support orders
  (prompt ensembling; zero-shot has one prompt); accuracy in percent."""

  task = "classification"

  def _outputs(self, model, params, tokenizer, ids, media, *, prompt_len, lm_only, plain):
    candidates = self.data.candidates
    conts = [prompting.continuation(c, self.task, self.template) for c in candidates]
    cand_ids = [tokenizer.encode(plain_text(c, self.template) if plain else c) for c in conts]
    result = model.rank(params, ids, media, cand_ids, self.data.load, prompt_len=prompt_len, lm_only=lm_only)
    return [
      dict(prediction=candidates[int(b)], scores={c: float(s) for c, s in zip(candidates, row)})
      for b, row in zip(result.best, result.scores)
    ]


def make_evaluator(name: str, config, image_size: int, prompt_format: str = "flamingo") -> Evaluator:
  """The evaluator `name` (a key of EVALUATORS) from the few-shot eval config, prompting in the
  model family's `prompt_format`."""
  if name not in EVALUATORS:
    raise KeyError(f"Unknown evaluator {name!r} in config.tasks; expected one of {sorted(EVALUATORS)}")
  options = config.task_options[name]
  num_queries = config.num_queries if options.num_queries < 0 else options.num_queries
  cls, make_data = EVALUATORS[name]
  data = make_data(config, options, image_size).subset(num_queries)
  max_new = config.max_new_tokens if cls is VQAEvaluator else config.caption_max_new_tokens
  return cls(
    data,
    max_new_tokens=max_new,
    prompt_bucket=config.prompt_bucket,
    num_prompts=config.num_prompts if cls is ClassificationEvaluator else 1,
    text_only_format=config.text_only_format,
    prompt_format=prompt_format,
  )


def _easy(kind, **kw):
  def make(c, o, size):
    return fewshot_data.easy_vqa_data(
      kind,
      c.data_dir,
      size,
      **kw,
      num_frames=c.video_frames,
      max_examples=None if o.max_examples < 0 else o.max_examples,
    )

  return make


def _jsonl(kind):
  return lambda c, o, size: fewshot_data.jsonl_data(kind, o.support, o.queries, size)


EVALUATORS = {
  "easy_vqa": (VQAEvaluator, _easy("vqa")),
  "easy_vqa_captions": (CaptionEvaluator, _easy("captions")),
  "easy_vqa_color": (ClassificationEvaluator, _easy("classification", attribute="color")),
  "easy_vqa_shape": (ClassificationEvaluator, _easy("classification", attribute="shape")),
  "easy_vqa_video": (CaptionEvaluator, _easy("video")),
  "jsonl_vqa": (VQAEvaluator, _jsonl("vqa")),
  "jsonl_captions": (CaptionEvaluator, _jsonl("captions")),
}
