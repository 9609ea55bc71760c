"""`easy_vqa_binding`: in-context binding of held-out invented names to easy-VQA test images.

    ev = BindingEvaluator.from_config(fewshot_eval_config, image_size=64, train_names=words)
    task_results, metrics = ev.sweep(model, params, tokenizer, seeds=(0, 1, 2))

Episodes are `flamingo_jax/data/binding.py: make_episode` (N ways, K shots, the controls). Each cell
(N, K, control) runs `episodes` episodes per seed, sharded over hosts; the sufficient statistics
(correct counts and the episode count) are summed over hosts before any ratio is formed.
  accuracy          open-ended: greedy decoding stopped at `<EOC>` (text-only: at a newline), correct
                    when the VQA-normalised generation equals the query class's name;
  ranked_accuracy   close-ended: the N names ranked by the log-likelihood of ' {name}' after the
                    prompt (the same prefill as the generation: `EvalModel.generate_and_score`);
  follows_support   the generation equals the name the support showed with the query's class (the
                    class's own name except under 'shuffled', where a binder follows the support).
The 'text_only' control runs the frozen LM alone on the prompt as plain text (`<image>` dropped,
`<EOC>` as a newline). Prompts are left-padded to a multiple of `prompt_bucket` and the media of a
prompt to a multiple of `media_bucket` (blank slots no token attends to), so the whole sweep
compiles a few shapes only. Metric keys: `eval/easy_vqa_binding/{N}way/{K}shot/{metric}` for the
invented names and `eval/easy_vqa_binding/{N}way/{K}shot/{control}/{metric}` for the controls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from flamingo_jax.data import binding as binding_lib
from flamingo_jax.eval import engine, evaluators, fewshot_data
from flamingo_jax.eval.metrics import vqa as vqa_lib

TASK = "easy_vqa_binding"
METRICS = ("accuracy", "ranked_accuracy", "follows_support")
_STATS = ("correct", "ranked_correct", "follows", "count")


def metric_key(n_way: int, k_shot: int, control: str, metric: str) -> str:
  where = "" if control == "none" else f"/{control}"
  return f"eval/{TASK}/{n_way}way/{k_shot}shot{where}/{metric}"


class BindingEvaluator:
  """The binding sweep over ways x shots x controls x seeds (see the module docstring)."""

  def __init__(
    self,
    images: Sequence[tuple[str, str, str]],
    load: Callable,
    names: Sequence[str],
    *,
    class_mode: str,
    ways: Sequence[int],
    shots: Sequence[int],
    episodes: int,
    controls: Sequence[str],
    ranked: bool,
    max_new_tokens: int,
    prompt_bucket: int = 32,
    media_bucket: int = 8,
  ):
    unknown = [c for c in controls if c not in binding_lib.CONTROLS or c == "none"]
    if unknown:
      raise ValueError(f"{TASK}: unknown controls {unknown}; expected some of {binding_lib.CONTROLS[1:]}")
    if episodes < 1 or not ways or not shots:
      raise ValueError(f"{TASK}: needs episodes >= 1, ways and shots; got {episodes}, {ways}, {shots}")
    self.pool = binding_lib.class_pool(images, class_mode)
    self.load, self.names = load, tuple(names)
    self.ways, self.shots, self.episodes = tuple(ways), tuple(shots), int(episodes)
    self.controls = ("none",) + tuple(controls)
    self.ranked, self.max_new_tokens = bool(ranked), int(max_new_tokens)
    self.prompt_bucket, self.media_bucket = int(prompt_bucket), int(media_bucket)
    self.predictions: list[dict[str, Any]] = []

  @classmethod
  def from_config(
    cls, config, image_size: int, train_names: Sequence[str], train_names_path: str = "train"
  ) -> BindingEvaluator:
    """From `config.task_options.easy_vqa_binding` of configs/fewshot_eval.py; checks that the
    evaluation names share no word with the training names."""
    o = config.task_options[TASK]
    names_path = binding_lib.resolve_word_list(o.names_file, "eval")
    names = binding_lib.read_word_list(names_path)
    binding_lib.check_disjoint(train_names, names, train_path=train_names_path, eval_path=names_path)
    images, load = fewshot_data.easy_vqa_images(
      config.data_dir, image_size, "test", None if o.max_examples < 0 else o.max_examples
    )
    return cls(
      images,
      load,
      names,
      class_mode=o.class_mode,
      ways=o.ways,
      shots=o.shots,
      episodes=o.episodes,
      controls=o.controls,
      ranked=o.ranked,
      max_new_tokens=o.max_new_tokens,
    )

  def _prompts(self, episodes, control, tokenizer):
    """(prompt ids, media refs padded to the bucket) of the episodes."""
    ids, media = [], []
    for e in episodes:
      text, refs = e.prompt()
      if control == "text_only":
        text, refs = evaluators.plain_text(text), ()
      ids.append([tokenizer.bos_id] + tokenizer.encode(text))
      media.append(refs)
    width = engine.bucket(max(len(m) for m in media), self.media_bucket) if media[0] else 0
    media = [tuple(m) + (fewshot_data.BLANK,) * (width - len(m)) for m in media]
    return ids, media, engine.bucket(max(len(i) for i in ids), self.prompt_bucket)

  def cell(
    self, model: engine.EvalModel, params, tokenizer, *, n_way: int, k_shot: int, seed: int, control: str
  ) -> dict[str, int]:
    """Statistics {correct, ranked_correct, follows, count} of one cell, summed over hosts."""
    indices = range(jax.process_index(), self.episodes, jax.process_count())
    episodes = [
      binding_lib.make_episode(
        self.pool, self.names, n_way=n_way, k_shot=k_shot, seed=seed, index=i, control=control
      )
      for i in indices
    ]
    ids, media, prompt_len = self._prompts(episodes, control, tokenizer)
    lm_only = control == "text_only"
    newline = tokenizer.encode("\n") if lm_only else []
    kw = dict(
      prompt_len=prompt_len,
      max_new_tokens=self.max_new_tokens,
      lm_only=lm_only,
      extra_stop_ids=newline if len(newline) == 1 else (),
    )
    ranked = None
    if self.ranked:
      conts = [[tokenizer.encode(f" {name}") for name in e.names] for e in episodes]
      generated, scores = model.generate_and_score(params, ids, media, conts, self.load, **kw)
      ranked = np.argmax(scores, -1)
    else:
      generated = model.generate(params, ids, media, self.load, **kw)
    stats = dict.fromkeys(_STATS, 0)
    self.predictions = []
    for j, (e, out) in enumerate(zip(episodes, generated)):
      prediction = vqa_lib.postprocess_generation(tokenizer.decode(out))
      said = vqa_lib.normalize_answer(prediction)
      shown = next(n for (_, c), n in zip(e.support, e.shown) if c == e.query_class)
      record = dict(
        episode=indices[j],
        classes=list(e.classes),
        names=list(e.names),
        answer=e.answer,
        shown=shown,
        prediction=prediction,
        correct=said == vqa_lib.normalize_answer(e.answer),
        follows=said == vqa_lib.normalize_answer(shown),
      )
      if ranked is not None:
        record["ranked"] = e.names[int(ranked[j])]
        stats["ranked_correct"] += int(ranked[j]) == e.query_class
      stats["correct"] += record["correct"]
      stats["follows"] += record["follows"]
      stats["count"] += 1
      self.predictions.append(record)
    total = evaluators.sum_over_hosts(np.asarray([stats[k] for k in _STATS], np.float64))
    return {k: int(v) for k, v in zip(_STATS, total)}

  def sweep(
    self,
    model,
    params,
    tokenizer,
    *,
    seeds: Sequence[int],
    on_cell: Callable[[str, dict], None] | None = None,
  ) -> tuple[dict, dict]:
    """(task results, flat metrics) over every cell and seed; `on_cell(name, record)` after each
    cell (e.g. to write its predictions). Values in percent; mean and std (ddof 0) over seeds."""
    per_seed: dict[tuple, dict[str, dict[int, float]]] = {}
    for seed in seeds:
      for n_way in self.ways:
        for k_shot in self.shots:
          for control in self.controls:
            t0 = time.time()
            s = self.cell(model, params, tokenizer, n_way=n_way, k_shot=k_shot, seed=seed, control=control)
            values = {"accuracy": s["correct"], "follows_support": s["follows"]}
            if self.ranked:
              values["ranked_accuracy"] = s["ranked_correct"]
            cell = per_seed.setdefault((n_way, k_shot, control), {})
            for metric, v in values.items():
              cell.setdefault(metric, {})[seed] = 100.0 * v / s["count"]
            name = f"{n_way}way_{k_shot}shot_{control}_seed{seed}"
            print(
              f"{TASK} {name}: "
              + " ".join(f"{m} {cell[m][seed]:.1f}" for m in values)
              + f" (chance {100 / n_way:.1f}; {s['count']} episodes; {time.time() - t0:.1f} s)",
              flush=True,
            )
            if on_cell is not None:
              on_cell(name, {"predictions": self.predictions})
    results = {
      "metric": "accuracy",
      "episodes": self.episodes,
      "seeds": list(seeds),
      "chance": {f"{n}way": 100.0 / n for n in self.ways},
      "cells": {},
    }
    metrics = {}
    for (n_way, k_shot, control), cell in per_seed.items():
      out = results["cells"].setdefault(control, {}).setdefault(f"{n_way}way", {})
      out[f"{k_shot}shot"] = {}
      for metric, values in cell.items():
        v = np.asarray(list(values.values()))
        out[f"{k_shot}shot"][metric] = {
          "mean": float(v.mean()),
          "std": float(v.std()),
          "seeds": {str(k): float(x) for k, x in values.items()},
        }
        metrics[metric_key(n_way, k_shot, control, metric)] = float(v.mean())
    return results, metrics


def format_table(results: dict) -> str:
  """Open-ended accuracy (mean ± std) per cell: rows N-way K-shot, columns the controls."""
  cells = results["cells"]
  controls = list(cells)
  lines = [f"{'cell':<13}{'chance':>8}" + "".join(f"{c:>18}" for c in controls)]
  for way in cells["none"]:
    for shot in cells["none"][way]:
      row = f"{way + ' ' + shot:<13}{results['chance'][way]:>8.1f}"
      for c in controls:
        a = cells[c][way][shot]["accuracy"]
        row += f"{a['mean']:>11.1f} ± {a['std']:<4.1f}"
      lines.append(row)
  return "\n".join(lines)


def plot(results: dict, path: str, write: Callable[[str, bytes], None]) -> None:
  """Accuracy vs shots, one panel per N: invented names (open and ranked), controls, chance."""
  import io  # pylint: disable=g-import-not-at-top

  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  cells, ways = results["cells"], list(results["cells"]["none"])
  fig, axes = plt.subplots(1, len(ways), figsize=(4.5 * len(ways), 4), squeeze=False)
  styles = {"none": "o-", "text_only": "k--", "shuffled": "r:", "real_names": "g-."}
  for ax, way in zip(axes[0], ways):
    for control, style in styles.items():
      for metric in ("accuracy", "ranked_accuracy"):
        by_shot = cells.get(control, {}).get(way, {})
        if not by_shot or metric not in next(iter(by_shot.values())):
          continue
        if metric == "ranked_accuracy" and control != "none":
          continue
        shots = list(by_shot)
        x = [int(s[:-4]) for s in shots]
        mean = np.array([by_shot[s][metric]["mean"] for s in shots])
        std = np.array([by_shot[s][metric]["std"] for s in shots])
        label = ("invented names" if control == "none" else control) + (
          " (ranked)" if metric == "ranked_accuracy" else ""
        )
        ax.errorbar(
          x,
          mean,
          yerr=std,
          fmt=style if metric == "accuracy" else "s-",
          alpha=1.0 if metric == "accuracy" else 0.6,
          label=label,
          capsize=3,
        )
    ax.axhline(results["chance"][way], color="gray", lw=1, label="chance")
    ax.set_title(f"{TASK}: {way}")
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  write(path, buf.getvalue())
