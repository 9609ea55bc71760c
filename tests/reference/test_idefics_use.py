"""A converted IDEFICS used as a run directory: `python -m flamingo_jax.convert --from idefics:DIR`
keeps its tokenizer (without its own image tokens, named as aliases), and `evaluate` runs few-shot
easy-VQA on it in IDEFICS's own prompt format, with IDEFICS's image rule (after an EOS no image until
the next) taken from the converted model config."""

import json
import os

from configs import fewshot_eval
from flamingo_jax import evaluate as evaluate_lib
from flamingo_jax.convert import __main__ as convert_main
from tests.data import data_helpers


def test_evaluate_runs_few_shot_easy_vqa_in_idefics_format(run_reference, tmp_path):
  src = tmp_path / "src"
  data_helpers.byte_tokenizer_json(tmp_path / "tokenizer")
  run_reference("make_idefics.py", src, "1", "vector", tmp_path / "tokenizer")
  out = tmp_path / "converted"
  convert_main.main(["--from", f"idefics:{src / 'model'}", "--out", str(out)])
  run_config = json.loads((out / "config.json").read_text())
  assert run_config["model"]["xattn"]["media_reset"] == "eos" and run_config["prompt_format"] == "idefics"

  config = fewshot_eval.get_config("tasks=easy_vqa,runlocal=True")
  with config.unlocked():
    config.data_dir = str(tmp_path / "tfds")
    config.output_subdir = str(tmp_path / "eval")
  results = evaluate_lib.evaluate(config, str(out))
  assert results["checkpoint_step"] == 0 and not results["baseline_at_init"]
  assert 0.0 <= results["metrics"]["eval/easy_vqa/random/2shot/accuracy"] <= 100.0
  with open(tmp_path / "eval" / "predictions" / "easy_vqa_random_2shot_seed0.jsonl") as f:
    prompt = json.loads(f.readline())["prompt"]
  # IDEFICS's image block: its <fake_token_around_image> is the model's <EOC> row (an alias).
  assert prompt.startswith("<EOC><image><EOC>Question: ") and prompt.endswith(" Answer:"), prompt
  assert os.path.exists(tmp_path / "eval" / "results.json")
