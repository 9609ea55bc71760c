"""The ablation table of docs/ABLATIONS.md from the runs of `launch/ablations.sh`.

    python -m flamingo_jax.eval.ablation_table runs/ablations

Reads RUNS/<name>/seed<s>/eval/results.json (the quick evaluation of each training seed) and prints
one Markdown row per ablation: easy-VQA 0 / 4-shot accuracy and in-context binding accuracy (2-way and
5-way, 1 shot, invented names), each as mean ± std over the training seeds, beside the paper's Table 3
figure and whether the run moves in the paper's direction relative to the baseline.
"""

import glob
import json
import os
import sys

import numpy as np

# The ablations of configs/ablations.py in its order, with Table 3 of the paper (overall score; the
# baseline 70.7). None: not in Table 3 as one number.
PAPER = {
  "baseline": 70.7,
  "tanh_off": 66.5,
  "round_robin": 62.9,
  "all_previous_images": 63.5,
  "xattn_every_2": None,
  "xattn_every_8": None,
  "p_next_half": None,
  "lm_unfrozen": None,
  "resampler_mlp": 66.6,
  "resampler_transformer": 66.7,
}
COLUMNS = {  # column -> path in results.json
  "VQA 0-shot": ("tasks", "easy_vqa", "random", "0", "mean"),
  "VQA 4-shot": ("tasks", "easy_vqa", "random", "4", "mean"),
  "binding 2-way": ("tasks", "easy_vqa_binding", "cells", "none", "2way", "1shot", "accuracy", "mean"),
  "binding 5-way": ("tasks", "easy_vqa_binding", "cells", "none", "5way", "1shot", "accuracy", "mean"),
}


def _get(tree: dict, path: tuple):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return float(tree)


def collect(runs: str) -> dict:
  """{ablation: {column: [value per seed]}} of the runs found (ablations without runs are absent)."""
  out = {}
  for name in PAPER:
    files = sorted(glob.glob(os.path.join(runs, name, "seed*", "eval", "results.json")))
    if not files:
      continue
    values = {column: [] for column in COLUMNS}
    for path in files:
      with open(path, encoding="utf-8") as f:
        results = json.load(f)
      for column, key in COLUMNS.items():
        value = _get(results, key)
        if value is None:
          raise KeyError(f"{path}: no {'/'.join(key)}")
        values[column].append(value)
    out[name] = values
  return out


def table(values: dict) -> str:
  """The Markdown table (mean ± std over seeds; the direction is that of the mean over all columns)."""
  mean_of = lambda name: float(np.mean([np.mean(v) for v in values[name].values()]))
  head = ["ablation", "seeds", *COLUMNS, "paper (Table 3)", "direction vs baseline (paper / here)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, columns in values.items():
    cells = [f"{np.mean(v):.1f} ± {np.std(v):.1f}" for v in columns.values()]
    paper = PAPER[name]
    direction = ""
    if name != "baseline" and "baseline" in values:
      here = "lower" if mean_of(name) < mean_of("baseline") else "not lower"
      want = "lower" if paper is not None and paper < PAPER["baseline"] else "—"
      direction = f"{want} / {here}"
    seeds = len(next(iter(columns.values())))
    lines.append(
      "| " + " | ".join([name, str(seeds), *cells, "" if paper is None else f"{paper}", direction]) + " |"
    )
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise SystemExit("usage: python -m flamingo_jax.eval.ablation_table RUNS_DIR")
  values = collect(argv[1])
  if not values:
    raise SystemExit(f"no RUNS/<ablation>/seed*/eval/results.json under {argv[1]}")
  print(table(values))


if __name__ == "__main__":
  main(sys.argv)
