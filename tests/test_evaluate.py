"""End to end: `python -m flamingo_jax.evaluate` on a tiny run directory (Orbax checkpoint,
config.json, a byte-level HF tokenizer) over users' JSONL data; results.json, predictions, plot."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from configs import fewshot_eval
from configs import flamingo as flamingo_config
from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import evaluate as evaluate_lib
from flamingo_jax.models import flamingo
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainable
from tests.data import data_helpers
from tests.data.data_helpers import image_bytes
from tests.models import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 2


def _jsonl(path, rows):
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("jsonl")
  for i in range(10):
    (d / f"{i}.png").write_bytes(image_bytes(size=(20, 16), seed=i))
  colors = ["red", "tan", "sky"]
  vqa = [{"image": f"{i}.png", "question": "what color?", "answers": [colors[i % 3]] * 3} for i in range(10)]
  caps = [{"image": f"{i}.png", "captions": [f"a {colors[i % 3]} box", "a box"]} for i in range(10)]
  return dict(
    vqa=(_jsonl(d / "vqa_train.jsonl", vqa[:6]), _jsonl(d / "vqa_test.jsonl", vqa[6:])),
    captions=(_jsonl(d / "cap_train.jsonl", caps[:6]), _jsonl(d / "cap_test.jsonl", caps[6:])),
  )


def _make_run(workdir, with_checkpoint: bool):
  """config.json of a tiny run (2 LM layers) and, optionally, a TrainState checkpoint."""
  config = flamingo_config.get_config("size=tiny")
  tokenizer_json = data_helpers.byte_tokenizer_json(os.path.join(workdir, "tokenizer"))
  with config.unlocked():
    config.model.lm.vocab_size = 257
    config.model.lm.num_layers, config.model.xattn.every = 2, 2
    config.tokenizer = f"hf:{tokenizer_json}"
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  if with_checkpoint:
    model = flamingo.make_model(config.model)
    size = config.model.image_size
    params = jax.jit(model.init)(
      jax.random.PRNGKey(0), jnp.zeros((1, 1, 1, size, size, 3)), jnp.zeros((1, 4), jnp.int32)
    )
    params = helpers.open_gates(params, jax.random.PRNGKey(1))
    train_p, frozen_p = trainable.split(params, config.trainable, config.frozen)
    state = state_lib.create(train_p, frozen_p, optax.adam(1e-3), jax.random.PRNGKey(2))
    with checkpoint_lib.Checkpointer(workdir, config=config) as ckpt:
      ckpt.save(STEP, state, {"step": STEP}, force=True)
  return workdir


def test_entry_point_end_to_end(tmp_path, data):
  workdir = _make_run(str(tmp_path / "run"), with_checkpoint=True)
  support, queries = data["vqa"]
  cmd = [
    sys.executable,
    "-m",
    "flamingo_jax.evaluate",
    "--config=configs/fewshot_eval.py:tasks=jsonl_vqa,shots=0.1,seeds=2",
    f"--workdir={workdir}",
    f"--config.task_options.jsonl_vqa.support={support}",
    f"--config.task_options.jsonl_vqa.queries={queries}",
    "--config.beam=1",
    "--config.batch_size=4",
    "--config.image_batch_size=8",
    "--config.prompt_bucket=128",
    "--config.max_new_tokens=3",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "text_only" in proc.stdout and "jsonl_vqa" in proc.stdout  # the table

  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  assert results["checkpoint_step"] == STEP and results["model_id"] == f"step{STEP}"
  r = results["tasks"]["jsonl_vqa"]
  assert r["metric"] == "accuracy" and r["num_queries"] == 4
  assert sorted(r["random"]) == sorted(r["rices"]) == sorted(r["text_only"]) == ["0", "1"]
  assert r["rices"]["0"] == r["random"]["0"]  # zero-shot: no selection
  for s in (r["random"]["1"], r["rices"]["1"], r["text_only"]["1"]):
    assert sorted(s["seeds"]) == ["0", "1"] and 0.0 <= s["mean"] <= 100.0 and s["std"] >= 0.0
  assert "eval/jsonl_vqa/rices/1shot/accuracy" in results["metrics"]

  files = sorted(os.listdir(os.path.join(out, "predictions")))
  assert len(files) == 10 and "jsonl_vqa_rices_1shot_seed1.jsonl" in files
  with open(os.path.join(out, "predictions", "jsonl_vqa_random_1shot_seed0.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 4 and {"prediction", "references", "support", "prompt"} <= set(records[0])
  with open(os.path.join(out, "accuracy_vs_shots.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(os.path.join(out, "rices_cache"))
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_without_checkpoint_evaluates_the_init_model(tmp_path, data):
  workdir = _make_run(str(tmp_path / "run"), with_checkpoint=False)
  config = fewshot_eval.get_config("tasks=jsonl_captions,shots=0,seeds=1")
  support, queries = data["captions"]
  with config.unlocked():
    config.baseline_at_init = True
    config.task_options.jsonl_captions.support = support
    config.task_options.jsonl_captions.queries = queries
    config.beam, config.batch_size, config.prompt_bucket = 1, 4, 128
    config.caption_max_new_tokens, config.text_only_baseline = 3, False
  results = evaluate_lib.evaluate(config, workdir)
  assert results["checkpoint_step"] is None and results["model_id"].startswith("init-random")
  assert results["baseline_at_init"] is True
  assert evaluate_lib.format_table(results).startswith(evaluate_lib.AT_INIT_BANNER)
  r = results["tasks"]["jsonl_captions"]
  assert r["metric"] == "cider" and set(r) >= {"random", "rices"} and "text_only" not in r
  assert os.path.exists(os.path.join(workdir, "eval", "accuracy_vs_shots.png"))


def test_binding_sweep_without_checkpoint(tmp_path):
  """`easy_vqa_binding` (runlocal: 2-way 1-shot, 8 episodes) on the real easy-VQA test images."""
  workdir = _make_run(str(tmp_path / "run"), with_checkpoint=False)
  config = fewshot_eval.get_config("tasks=easy_vqa_binding,runlocal=True")
  with config.unlocked():
    config.data_dir = str(tmp_path / "tfds")
    config.baseline_at_init = True
    config.task_options.easy_vqa_binding.controls = ("text_only", "shuffled")
  results = evaluate_lib.evaluate(config, workdir)
  r = results["tasks"]["easy_vqa_binding"]
  assert set(r["cells"]) == {"none", "text_only", "shuffled"} and r["chance"] == {"2way": 50.0}
  assert set(r["cells"]["none"]["2way"]["1shot"]["accuracy"]["seeds"]) == {"0"}
  for key in (
    "eval/easy_vqa_binding/2way/1shot/accuracy",
    "eval/easy_vqa_binding/2way/1shot/text_only/accuracy",
    "eval/easy_vqa_binding/2way/1shot/shuffled/accuracy",
  ):
    assert 0.0 <= results["metrics"][key] <= 100.0
  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "binding_vs_shots.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "predictions", "easy_vqa_binding_2way_1shot_none_seed0.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 8 and {"answer", "prediction", "names", "shown"} <= set(records[0])
  assert not os.path.exists(os.path.join(out, "accuracy_vs_shots.png"))  # no few-shot task ran


def test_settings_order_and_text_only_shots():
  config = fewshot_eval.get_config("shots=0.4.8")
  with config.unlocked():
    config.selection = ("random", "rices")
  runs = list(evaluate_lib._settings(config))
  assert runs[:5] == [
    ("random", 0, False),
    ("random", 4, False),
    ("rices", 4, False),
    ("random", 8, False),
    ("rices", 8, False),
  ]
  assert [r[1] for r in runs[5:]] == [0, 4, 8]
  with config.unlocked():
    config.text_only_shots = (4,)
  assert [r for r in evaluate_lib._settings(config) if r[2]] == [("text_only", 4, True)]


@pytest.mark.parametrize("kind", ["missing", "empty", "config_only"])
def test_refuses_a_run_directory_without_checkpoint(tmp_path, kind):
  workdir = str(tmp_path / "rnu")  # a mistyped run directory
  if kind == "empty":
    os.makedirs(workdir)
  elif kind == "config_only":
    _make_run(workdir, with_checkpoint=False)
  config = fewshot_eval.get_config("tasks=easy_vqa,runlocal=True")
  with pytest.raises(evaluate_lib.NoCheckpointError, match="baseline_at_init=True") as e:
    evaluate_lib.evaluate(config, workdir)
  assert workdir in str(e.value)
  assert not os.path.exists(os.path.join(workdir, "eval"))  # nothing written


def test_entry_point_exits_nonzero_on_a_missing_run_directory(tmp_path):
  workdir = str(tmp_path / "no_such_run")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "flamingo_jax.evaluate",
      "--config=configs/fewshot_eval.py:runlocal=True",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode != 0
  assert f"--workdir {workdir} does not exist" in proc.stderr
  assert "--config.baseline_at_init=True" in proc.stderr
  assert not os.path.exists(workdir)
