"""A converted OpenFlamingo used as a run directory: `python -m flamingo_jax.convert` writes it
atomically, `evaluate` runs few-shot easy-VQA on it, and `configs/pretrained.py:dir=` fine-tunes it
through `init_from`: after the steps the LM and the vision encoder are bit-identical, the resampler
and the blocks have moved."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import fewshot_eval, pretrained
from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import evaluate as evaluate_lib
from flamingo_jax import sources
from flamingo_jax.convert import converted
from flamingo_jax.train import loop
from tests.data import data_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args: str) -> str:
  proc = subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


@pytest.fixture(scope="module")
def converted_dir(run_reference, tmp_path_factory):
  """A tiny OpenFlamingo (Llama, byte-level tokenizer of 257 tokens) converted by the CLI."""
  src = tmp_path_factory.mktemp("open_flamingo_src")
  data_helpers.byte_tokenizer_json(src / "tokenizer")
  run_reference("make_open_flamingo.py", src, "llama", 2, src / "tokenizer")
  out = str(tmp_path_factory.mktemp("converted") / "open_flamingo")
  _run(
    "-m",
    "flamingo_jax.convert",
    f"--from=open_flamingo:{src / 'checkpoint.safetensors'}",
    f"--lm={src / 'lm'}",
    f"--vision={src / 'visual.safetensors'}",
    "--vision_variant=ViT-test",
    "--every=2",
    f"--out={out}",
  )
  return out


def test_output_directory(converted_dir):
  names = sorted(os.listdir(converted_dir))
  assert names == sorted(
    ["config.json", "lm_config.json", "params", "source.json", "tokenizer.json", "tokenizer_config.json"]
  )
  with open(os.path.join(converted_dir, "config.json")) as f:
    run_config = json.load(f)
  assert run_config["model"]["xattn"]["first"] == 1 and run_config["model"]["lm"]["vocab_size"] == 257
  assert run_config["tokenizer"] == f"hf:{converted_dir}/tokenizer.json"
  assert run_config["prompt_format"] == "open_flamingo"
  tok = sources.make_tokenizer(run_config["tokenizer"])
  assert (
    tok.encode("a<|endofchunk|><image>")
    == tok.encode("a<EOC><image>")
    == [tok.encode("a")[0], tok.eoc_id, tok.image_id]
  )
  lm_config, lm_params = converted.load_converted(converted_dir)  # the LM spec `converted:DIR`
  assert sorted(lm_params) == ["lm/embed", "lm/final_norm", "lm/layers", "lm/unembed"]
  assert not [n for n in os.listdir(os.path.dirname(converted_dir)) if ".tmp-" in n]


def test_evaluate_runs_few_shot_easy_vqa(converted_dir, tmp_path):
  config = fewshot_eval.get_config("tasks=easy_vqa,runlocal=True")
  with config.unlocked():
    config.data_dir = str(tmp_path / "tfds")
    config.output_subdir = str(tmp_path / "eval")
  results = evaluate_lib.evaluate(config, converted_dir)
  assert results["checkpoint_step"] == 0 and not results["baseline_at_init"]
  assert 0.0 <= results["metrics"]["eval/easy_vqa/random/2shot/accuracy"] <= 100.0
  assert os.path.exists(tmp_path / "eval" / "results.json")
  with open(tmp_path / "eval" / "predictions" / "easy_vqa_random_2shot_seed0.jsonl") as f:
    prompt = json.loads(f.readline())["prompt"]
  assert prompt.startswith("<image>Question:") and "Short answer:" in prompt  # OpenFlamingo's own prompts


def test_fine_tuning_moves_only_the_trained_parts(converted_dir, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train(pretrained.get_config(f"dir={converted_dir},data=synthetic,steps=3"), workdir)  # as the CLI
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    state = ckpt.restore()[0]
  from flamingo_jax import init_from  # pylint: disable=g-import-not-at-top

  trained = {**state["params"], **state["frozen"]}
  template = {
    m: {n: np.zeros(np.shape(a), np.float32) for n, a in leaves.items()} for m, leaves in trained.items()
  }
  start = init_from.load_params_subset(converted_dir, ".*", template, kind="params")
  for module, leaves in trained.items():
    for name, value in leaves.items():
      same = np.array_equal(np.asarray(value, np.float32), np.asarray(start[module][name], np.float32))
      if module.startswith(("vision_encoder", "lm/embed", "lm/layers", "lm/final_norm", "lm/unembed")):
        assert same, f"{module}/{name} changed"
  moved = [
    m
    for m in ("perceiver_resampler", "lm/gated_xattn")
    if not all(
      np.array_equal(np.asarray(trained[k][n], np.float32), start[k][n])
      for k in trained
      if k.startswith(m)
      for n in trained[k]
    )
  ]
  assert moved == ["perceiver_resampler", "lm/gated_xattn"]
