"""Questions per second of k-shot easy-VQA evaluation (beam search, KV cache) on this machine.

    python benchmarks/eval_throughput.py --workdir runs/main/flamingo --data_dir runs/main/tfds
    python benchmarks/eval_throughput.py --workdir /tmp/no_run --num_queries 64   # init model

RUN's latest checkpoint, or Flamingo at initialisation with the LM of `--lm` when RUN has none
(`flamingo_jax/evaluate.py: setup`). Evaluates `--num_queries` easy-VQA test questions (random
selection, seed 0) and prints questions/s end to end, and without the time JAX spent tracing and
compiling (measured with `jax.monitoring` compile events). Never asserted in tests: the machines
are shared and noisy; quote ratios against a baseline run in the same session.
"""

import os
import sys
import time

import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import fewshot_eval
from flamingo_jax import evaluate as evaluate_lib
from flamingo_jax.eval import evaluators
from flamingo_jax.models import flamingo

_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Run directory (checkpoint + config.json), or any directory without a checkpoint for the init model.",
)
_DATA_DIR = flags.DEFINE_string("data_dir", "runs/tfds", "TFDS data_dir of easy_vqa.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 500, "Test questions to evaluate.")
_SHOTS = flags.DEFINE_integer("shots", 4, "In-context examples per question.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per decoding call.")
_BEAM = flags.DEFINE_integer("beam", 3, "Beam size (1: greedy).")
_LM = flags.DEFINE_string("lm", "auto", "LM without a checkpoint (configs/fewshot_eval.py: lm).")
_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


def main(argv):
  del argv
  config = fewshot_eval.get_config()
  with config.unlocked():
    config.data_dir, config.num_queries = _DATA_DIR.value, _NUM_QUERIES.value
    config.batch_size, config.beam, config.lm = _BATCH.value, _BEAM.value, _LM.value
    config.baseline_at_init = True  # a workdir without a checkpoint times the init model
  workdir = _WORKDIR.value
  run_config = evaluate_lib.load_run_config(workdir)
  model_cfg = run_config.model if run_config is not None else flamingo.model_config(config.model_size)
  model, tokenizer, params, model_id, step = evaluate_lib.setup(config, workdir, run_config, model_cfg)
  evaluator = evaluators.make_evaluator("easy_vqa", config, model_cfg.image_size)
  compile_s = [0.0]

  def listener(event, duration, **kwargs):
    del kwargs
    if event in _COMPILE_EVENTS:
      compile_s[0] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  t0 = time.time()
  metrics = dict(
    evaluator.run(model, params, tokenizer, shots=_SHOTS.value, selection="random", seed=0, model_id=model_id)
  )
  elapsed = time.time() - t0
  n = int(metrics["num_queries"])
  print(
    f"model {model_id} (checkpoint step {step}), {n} questions, {_SHOTS.value}-shot, beam "
    f"{config.beam}, batch {config.batch_size}: accuracy {metrics['accuracy']:.1f}%, "
    f"{elapsed:.1f} s of which {compile_s[0]:.1f} s tracing/compiling"
  )
  print(
    f"{n / elapsed:.3f} questions/s end to end; "
    f"{n / max(elapsed - compile_s[0], 1e-9):.3f} questions/s without compilation"
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
