"""Few-shot evaluation of a run (paper §2.5, App. B.1.4-5) from its Orbax checkpoint.

    python -m flamingo_jax.evaluate --config configs/fewshot_eval.py --workdir RUN \
        [--config.data_dir=runs/main/tfds] [--config.shots='(0, 4)'] [--config.seeds='(0,)']

Params: RUN's latest checkpoint (trainable and frozen params merged, nothing else read). A RUN
without a checkpoint is an error (`NoCheckpointError`), unless `config.baseline_at_init` asks for
Flamingo at initialisation with the frozen LM of `config.lm` swapped in
(gates at 0: it computes the LM) and, if the run's config names one, the stage-1 vision encoder;
this gives the baselines. Model and tokenizer come from RUN/config.json (else `config.model_size`, 'smollm2').

For every task, shots, selection (0-shot: random text-only examples only, reported under both
selections) and seed it runs the evaluator, then the text-only baseline (the same random-selection
prompts through the frozen LM alone: `lm_only=True`, no images). Writes, atomically (temp + rename):
  RUN/eval/results.json           per task: {selection|'text_only': {shots: {mean, std, seeds}}},
                                  std over seeds (ddof 0); accuracy in %, CIDEr x 100
  RUN/eval/predictions/*.jsonl    one record per query: {task}_{selection}_{shots}shot_seed{s}
  RUN/eval/accuracy_vs_shots.png  metric vs shots, random and RICES, text-only baseline dashed
  RUN/eval/binding_vs_shots.png   in-context binding (`easy_vqa_binding`, eval/binding.py): accuracy
                                  vs shots per N, with the controls and chance
  RUN/eval/rices_cache/           support features of RICES
and prints a table. Only process 0 writes. `eval` is `config.output_subdir` (its default).
"""

import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from flamingo_jax import sources
from flamingo_jax.data import binding as binding_lib
from flamingo_jax.eval import binding, engine, evaluators
from flamingo_jax.models import flamingo

TEXT_ONLY = "text_only"
AT_INIT_BANNER = "BASELINE: Flamingo at initialisation, no checkpoint (config.baseline_at_init)"


class NoCheckpointError(FileNotFoundError):
  """The run directory has no checkpoint and the at-initialisation baseline was not asked for."""


def check_workdir(config, workdir: str) -> int | None:
  """RUN's latest checkpoint step (0 for a converted model: `python -m flamingo_jax.convert`); None
  only when `config.baseline_at_init` (else raises)."""
  from flamingo_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax import init_from  # pylint: disable=g-import-not-at-top

  step = checkpoint_lib.latest_checkpoint_step(workdir)
  if step is None and init_from.is_converted(workdir):
    step = 0
  if step is None and not config.baseline_at_init:
    what = (
      "does not exist"
      if not os.path.isdir(workdir)
      else f"has no complete checkpoint under {os.path.join(workdir, 'checkpoints')}"
    )
    raise NoCheckpointError(
      f"--workdir {workdir} {what}; to evaluate the model at initialisation (the baselines), "
      "pass --config.baseline_at_init=True"
    )
  return step


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it into place."""
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_run_config(workdir: str) -> ml_collections.ConfigDict | None:
  """RUN/config.json (written by the training loop) as a ConfigDict, or None."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from None


def _lm_spec(config, run_config) -> str:
  if config.lm == "auto":
    return run_config.init_from.lm if run_config is not None else "smollm2"
  return "" if config.lm == "none" else config.lm


def load_params(config, workdir: str, model_cfg, run_config) -> tuple[Any, str, int | None]:
  """(params on the default device, model id for the RICES cache, checkpoint step or None)."""
  from flamingo_jax import (
    generate,  # pylint: disable=g-import-not-at-top
    init_from,  # pylint: disable=g-import-not-at-top
  )

  step = check_workdir(config, workdir)
  if step is not None:
    params = generate.restore_params(model_cfg, workdir, text_only=False)
    return jax.device_put(params), f"step{step}", step
  rng = jax.random.PRNGKey(config.seed)
  spec = _lm_spec(config, run_config)
  if spec:
    from flamingo_jax import pretrained  # pylint: disable=g-import-not-at-top

    params = pretrained.init_flamingo_with_lm(model_cfg, spec, rng)
  else:
    model = flamingo.make_model(model_cfg)
    size = model_cfg.image_size
    params = jax.jit(model.init)(rng, jnp.zeros((1, 1, 1, size, size, 3)), jnp.zeros((1, 1), int))
  vision = run_config.init_from.vision if run_config is not None else ""
  if vision:
    params = init_from.load_params_subset(vision, init_from.VISION_PARAMS, params)
  model_id = f"init-{spec or 'random'}-seed{config.seed}" + (f"-vision:{vision}" if vision else "")
  return jax.device_put(params), model_id, None


def _summary(values: dict[int, float]) -> dict[str, Any]:
  v = np.asarray(list(values.values()), np.float64)
  return {
    "mean": float(v.mean()),
    "std": float(v.std()),
    "seeds": {str(s): float(x) for s, x in values.items()},
  }


def plot(results: dict, path: str) -> None:
  """Metric vs shots per task: random and RICES solid, the text-only baseline dashed."""
  import io  # pylint: disable=g-import-not-at-top

  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  tasks = {t: r for t, r in results["tasks"].items() if t != binding.TASK}  # its own plot
  fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4), squeeze=False)
  for ax, (task, r) in zip(axes[0], tasks.items()):
    for selection, style in (("random", "o-"), ("rices", "s-"), (TEXT_ONLY, "k--")):
      if r.get(selection):
        shots = sorted(r[selection], key=int)
        mean = np.array([r[selection][s]["mean"] for s in shots])
        std = np.array([r[selection][s]["std"] for s in shots])
        x = [int(s) for s in shots]
        label = "text-only LM" if selection == TEXT_ONLY else selection
        ax.plot(x, mean, style, label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xticks(sorted({int(s) for sel in r.values() if isinstance(sel, dict) for s in sel}))
    ax.set_title(task)
    ax.set_xlabel("shots")
    ax.set_ylabel(r["metric"] + (" (%)" if r["metric"] == "accuracy" else " (x100)"))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def format_table(results: dict) -> str:
  lines = [AT_INIT_BANNER] if results["baseline_at_init"] else []
  lines += [f"{'task':<20} {'metric':<9} {'selection':<10} {'shots':>5} {'mean':>8} {'std':>7} {'seeds':>5}"]
  for task, r in results["tasks"].items():
    if task == binding.TASK:  # its own table (binding.format_table)
      continue
    for selection in ("random", "rices", TEXT_ONLY):
      for shots, s in sorted(r.get(selection, {}).items(), key=lambda kv: int(kv[0])):
        lines.append(
          f"{task:<20} {r['metric']:<9} {selection:<10} {shots:>5} {s['mean']:>8.2f} "
          f"{s['std']:>7.2f} {len(s['seeds']):>5}"
        )
  return "\n".join(lines)


def _settings(config):
  """(selection, shots, lm_only) in run order; 0-shot once (random), then the text-only runs."""
  for shots in config.shots:
    for selection in ["random"] if shots == 0 else list(config.selection):
      yield selection, shots, False
  if config.text_only_baseline:
    for shots in config.text_only_shots or config.shots:
      yield TEXT_ONLY, shots, True


def setup(config, workdir: str, run_config, model_cfg):
  """(EvalModel, tokenizer, params, model id, checkpoint step or None) of RUN."""

  tok_spec = config.tokenizer or (run_config.tokenizer if run_config is not None else "smollm2")
  tokenizer = sources.make_tokenizer(tok_spec, _lm_spec(config, run_config))
  vocab = model_cfg.lm.vocab_size + model_cfg.lm.num_extra_tokens
  if tokenizer.vocab_size != vocab:
    raise ValueError(f"tokenizer {tok_spec!r} has {tokenizer.vocab_size} ids, the model {vocab}")
  params, model_id, step = load_params(config, workdir, model_cfg, run_config)
  model = engine.EvalModel(
    flamingo.make_model(model_cfg),
    tokenizer,
    batch_size=config.batch_size,
    num_beams=config.beam,
    length_penalty=config.length_penalty,
    image_batch_size=config.image_batch_size,
    visual_cache_size=config.visual_cache_size,
    # <image> is never generated; at initialisation neither is <EOC> (untrained embedding).
    banned_ids=[tokenizer.image_id] + ([tokenizer.eoc_id] if step is None else []),
  )
  return model, tokenizer, params, model_id, step


def evaluate(config, workdir: str) -> dict:
  """Runs the configured evaluators on RUN's params; returns (and writes) the results dict.

  Long: the run's steps (check, set-up, each task, plots, write) top to bottom.
  """
  unknown = [s for s in config.selection if s not in ("random", "rices")]
  if unknown or any(s < 0 for s in config.shots):
    raise ValueError(
      f"config.selection must hold 'random'/'rices' (got {list(config.selection)}) "
      f"and config.shots non-negative counts (got {list(config.shots)})"
    )
  writer = jax.process_index() == 0
  check_workdir(config, workdir)  # before anything is built or written
  out_dir = os.path.join(workdir, config.output_subdir)
  run_config = load_run_config(workdir)
  model_cfg = run_config.model if run_config is not None else flamingo.model_config(config.model_size)
  model, tokenizer, params, model_id, step = setup(config, workdir, run_config, model_cfg)
  results = {
    "workdir": os.path.abspath(workdir),
    "checkpoint_step": step,
    "model_id": model_id,
    "baseline_at_init": step is None,
    "tasks": {},
    "metrics": {},
    "config": config.to_dict(),
  }
  if step is None:
    print(AT_INIT_BANNER, flush=True)
  for task in config.tasks:
    if task == binding.TASK:
      _binding(config, model, tokenizer, params, run_config, model_cfg, results, out_dir, writer)
      continue
    evaluator = evaluators.make_evaluator(
      task, config, model_cfg.image_size, prompt_format(config, run_config)
    )
    r = results["tasks"][task] = {"metric": evaluator.metric, "num_queries": len(evaluator.data.queries)}
    for selection, shots, lm_only in _settings(config):
      per_seed = {}
      for seed in config.seeds:
        t0 = time.time()
        metrics = dict(
          evaluator.run(
            model,
            params,
            tokenizer,
            shots=shots,
            lm_only=lm_only,
            seed=seed,
            selection="random" if lm_only else selection,
            rices_dir=os.path.join(out_dir, "rices_cache"),
            model_id=model_id,
          )
        )
        per_seed[seed] = metrics[evaluator.metric]
        msg = (
          f"{task} {selection} {shots}-shot seed {seed}: {evaluator.metric} "
          f"{per_seed[seed]:.2f} ({time.time() - t0:.1f} s)"
        )
        logging.info(msg)
        print(msg, flush=True)
        if writer:
          lines = "".join(json.dumps(p) + "\n" for p in evaluator.predictions)
          atomic_write(
            os.path.join(out_dir, "predictions", f"{task}_{selection}_{shots}shot_seed{seed}.jsonl"),
            lines.encode(),
          )
      r.setdefault(selection, {})[str(shots)] = _summary(per_seed)
      results["metrics"][f"eval/{task}/{selection}/{shots}shot/{evaluator.metric}"] = r[selection][
        str(shots)
      ]["mean"]
      if shots == 0 and not lm_only and "rices" in config.selection:
        r.setdefault("rices", {})["0"] = r["random"]["0"]  # zero-shot has no selection
        results["metrics"][f"eval/{task}/rices/0shot/{evaluator.metric}"] = r["random"]["0"]["mean"]
      if writer:
        atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1).encode())
  if writer and any(t != binding.TASK for t in results["tasks"]):
    plot(results, os.path.join(out_dir, "accuracy_vs_shots.png"))
    print(format_table(results), flush=True)
  return results


def prompt_format(config, run_config) -> str:
  """`config.prompt_format`, where 'auto' is the run's own (a converted model's family) or the paper's."""
  if config.prompt_format != "auto":
    return config.prompt_format
  return run_config.prompt_format if run_config is not None and "prompt_format" in run_config else "flamingo"


def training_names(run_config) -> tuple[tuple[str, ...], str]:
  """(words, path) of the word list the run's bursty documents were named from (the packaged
  training list when the run has none)."""
  paths = set()
  if run_config is not None and run_config.data.source == "mixture":
    for ds in run_config.data.datasets.values():
      if ds.builder == "easy_vqa" and ds.builder_kwargs.kind == "bursty":
        paths.add(binding_lib.resolve_word_list(ds.builder_kwargs.names_file, "train"))
  if len(paths) > 1:
    raise ValueError(f"the run names bursty documents from several word lists {sorted(paths)}")
  path = paths.pop() if paths else binding_lib.default_word_list("train")
  return binding_lib.read_word_list(path), path


def _binding(config, model, tokenizer, params, run_config, model_cfg, results, out_dir, writer):
  """The in-context binding sweep into `results` (task `easy_vqa_binding`) and its plot."""
  words, path = training_names(run_config)
  evaluator = binding.BindingEvaluator.from_config(config, model_cfg.image_size, words, path)

  def on_cell(name, record):
    if writer:
      lines = "".join(json.dumps(p) + "\n" for p in record["predictions"])
      atomic_write(os.path.join(out_dir, "predictions", f"{binding.TASK}_{name}.jsonl"), lines.encode())

  task_results, metrics = evaluator.sweep(model, params, tokenizer, seeds=config.seeds, on_cell=on_cell)
  results["tasks"][binding.TASK] = task_results
  results["metrics"].update(metrics)
  if writer:
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1).encode())
    binding.plot(task_results, os.path.join(out_dir, "binding_vs_shots.png"), atomic_write)
    print(binding.format_table(task_results), flush=True)


def main():
  # Flags are defined only when run as a program: importing this module defines nothing.
  config = config_flags.DEFINE_config_file("config", None, "e.g. configs/fewshot_eval.py", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "The run directory (checkpoints, config.json).")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX
    try:
      evaluate(config.value, workdir.value)
    except NoCheckpointError as e:
      sys.exit(f"evaluate: {e}")

  app.run(_main)


if __name__ == "__main__":
  sys.exit(main())
