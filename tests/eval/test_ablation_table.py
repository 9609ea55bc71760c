"""The ablation table from runs laid out as launch/ablations.sh writes them."""

import json
import os

import pytest

from configs import ablations
from flamingo_jax.eval import ablation_table


def _results(vqa0, vqa4, two, five):
  cell = lambda v: {"accuracy": {"mean": v}}
  return {
    "tasks": {
      "easy_vqa": {"random": {"0": {"mean": vqa0}, "4": {"mean": vqa4}}},
      "easy_vqa_binding": {"cells": {"none": {"2way": {"1shot": cell(two)}, "5way": {"1shot": cell(five)}}}},
    }
  }


def _write(root, name, seed, results):
  folder = os.path.join(root, name, f"seed{seed}", "eval")
  os.makedirs(folder)
  with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f)


def test_the_table_has_every_column_over_seeds_and_the_direction(tmp_path, capsys):
  assert tuple(ablation_table.PAPER) == ablations.ABLATIONS
  _write(tmp_path, "baseline", 0, _results(60, 62, 55, 20))
  _write(tmp_path, "baseline", 1, _results(62, 64, 57, 22))
  _write(tmp_path, "tanh_off", 0, _results(50, 50, 50, 20))
  text = ablation_table.table(ablation_table.collect(str(tmp_path)))
  lines = text.splitlines()
  assert len(lines) == 4 and lines[2].startswith("| baseline | 2 | 61.0 ± 1.0 | 63.0 ± 1.0 | 56.0 ± 1.0")
  assert lines[3].startswith("| tanh_off | 1 | 50.0 ± 0.0") and lines[3].endswith("| 66.5 | lower / lower |")
  ablation_table.main(["ablation_table", str(tmp_path)])  # the entry point prints the same table
  assert capsys.readouterr().out.strip() == text


def test_a_result_without_a_column_names_the_file(tmp_path):
  _write(tmp_path, "baseline", 0, {"tasks": {}})
  with pytest.raises(KeyError, match="baseline/seed0/eval/results.json"):
    ablation_table.collect(str(tmp_path))
