"""SmolLM2-135M greedy decoding speed: KV cache vs recomputing the full forward for every token.

    python benchmarks/decode.py [--new_tokens 64] [--prompt_tokens 16] [--runs 3] [--threads 2]
    python benchmarks/decode.py --hf            # also Hugging Face transformers on the same GGUF

Batch 1, fp32 (`configs/main_job.py`, Flamingo at init == the LM, text-only prompt):
  cached    `eval/decoding.greedy_decode`: prefill, then one token per `lax.while_loop` step
            reading/writing the KV cache (`eval/engine.py: EvalModel.decode_fns`, what `generate`
            and the evaluation run), one jit;
  uncached  a jitted `lax.fori_loop` that re-runs the whole forward over a [1, P+N] buffer
            (right-padded: the causal mask keeps padding out of earlier positions) per new token.
  cached, LM alone   as `cached` for the same LM without the gated xattn blocks (xattn.every=0):
            one flat `lax.scan` over the 30 layers instead of groups of (block, 4 layers).
All are timed end to end (prefill included) after a warm-up call; the table shows medians over
`--runs` and tokens/s = new tokens / median wall seconds. Their tokens must agree (checked).
The CPU seconds (all threads of the process) are less sensitive to other jobs on a shared machine.

`--hf` runs transformers' `generate` (greedy, `use_cache` True and False, `torch.set_num_threads`)
on the dequantised GGUF in another interpreter, since torch/transformers are not in this project's
environment. Make one with:
    python -m venv /tmp/hfbench && /tmp/hfbench/bin/pip install torch==2.13.0 transformers gguf accelerate
(`--hf_python` picks another interpreter). The HF worker imports nothing from this project.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HF_PYTHON = "/tmp/hfbench/bin/python"
HF_VENV_HELP = (
  "python -m venv /tmp/hfbench && /tmp/hfbench/bin/pip install torch==2.13.0 transformers gguf accelerate"
)
PROMPT = (
  "The history of the printing press begins in the fifteenth century, when Johannes "
  "Gutenberg combined movable metal type with an oil-based ink and a screw press."
)


def _limit_threads(threads: int) -> None:
  """Pin this process to `threads` CPUs and size XLA's CPU pools; before JAX is imported."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) > threads:
    os.sched_setaffinity(0, cpus[:threads])
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
    f" intra_op_parallelism_threads={threads}"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _median_time(fn, runs: int) -> tuple[float, float]:
  """Median (wall seconds, process CPU seconds) of `runs` calls after a warm-up call."""
  fn()  # warm-up: compilation
  wall, cpu = [], []
  for _ in range(runs):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def jax_bench(prompt_ids, new_tokens: int, runs: int) -> tuple[dict, list]:
  """{method: (median wall s, median CPU s)} and the cached run's tokens.

  Long: one timing protocol (warm-up, repeats, the three methods) in one place.
  """
  sys.path.insert(0, REPO_ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from flamingo_jax import pretrained, sources  # pylint: disable=g-import-not-at-top
  from flamingo_jax.eval import decoding  # pylint: disable=g-import-not-at-top
  from flamingo_jax.eval import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top

  model_cfg = flamingo.model_config("smollm2")  # = configs/main_job.py's model
  tokenizer = sources.make_tokenizer("smollm2", "smollm2")
  params = pretrained.init_flamingo_with_lm(model_cfg, "smollm2", jax.random.PRNGKey(0), text_only=True)
  params = jax.device_put(params)
  model = flamingo.make_model(model_cfg)
  prefill, decode_step = engine_lib.EvalModel(model, tokenizer, batch_size=1).decode_fns(new_tokens)
  tokens = jnp.asarray([prompt_ids], jnp.int32)
  mask = jnp.ones(tokens.shape, bool)

  def cached():
    # stop id -1 never occurs: always exactly `new_tokens` tokens.
    out = decoding.greedy_decode(
      prefill, decode_step, params, tokens, mask, max_new_tokens=new_tokens, stop_ids=(-1,), pad_id=0
    )
    return np.asarray(out.tokens[0])

  p = len(prompt_ids)

  @jax.jit
  def uncached_loop(params, prompt):
    buf = jnp.zeros([1, p + new_tokens], jnp.int32).at[:, :p].set(prompt)
    valid = jnp.zeros([1, p + new_tokens], bool).at[:, :p].set(True)

    def body(i, carry):
      buf, valid = carry
      logits, _ = model.lm_forward(params, None, buf, None, None, valid, None, False)
      nxt = jnp.argmax(logits[0, p + i - 1]).astype(jnp.int32)
      return buf.at[0, p + i].set(nxt), valid.at[0, p + i].set(True)

    buf, _ = jax.lax.fori_loop(0, new_tokens, body, (buf, valid))
    return buf[0, p:]

  def uncached():
    return np.asarray(uncached_loop(params, tokens))

  # The same LM without gated xattn blocks (xattn.every = 0): one flat scan over the layers
  # instead of groups of (block, `every` layers); isolates the cost of that structure.
  plain_cfg = flamingo.model_config("smollm2")
  plain_cfg.xattn.every = 0
  plain_params = jax.device_put(
    pretrained.init_flamingo_with_lm(plain_cfg, "smollm2", jax.random.PRNGKey(0), text_only=True)
  )
  plain_model = flamingo.make_model(plain_cfg)
  plain_fns = engine_lib.EvalModel(plain_model, tokenizer, batch_size=1).decode_fns(new_tokens)

  def cached_plain():
    out = decoding.greedy_decode(
      *plain_fns, plain_params, tokens, mask, max_new_tokens=new_tokens, stop_ids=(-1,), pad_id=0
    )
    return np.asarray(out.tokens[0])

  a, b, c = cached(), uncached(), cached_plain()
  if not (np.array_equal(a, b) and np.array_equal(a, c)):
    raise AssertionError(f"cached, uncached and plain-LM greedy tokens differ:\n{a}\n{b}\n{c}")
  return {
    "jax cached": _median_time(cached, runs),
    "jax uncached": _median_time(uncached, runs),
    "jax cached, LM alone": _median_time(cached_plain, runs),
  }, [int(t) for t in a]


# --------------------------------------------------------------------------- Hugging Face worker


def hf_worker(args: dict) -> dict:
  """Runs inside the HF interpreter: {method: (wall s, CPU s), 'tokens': cached greedy ids}."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args["threads"])
  model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(args["gguf"]), gguf_file=os.path.basename(args["gguf"]), torch_dtype=torch.float32
  )
  model.eval()
  ids = torch.tensor([args["prompt_ids"]], dtype=torch.long)
  n = args["new_tokens"]
  result = {}
  for use_cache in (True, False):

    def run(use_cache=use_cache):
      with torch.inference_mode():
        return model.generate(
          ids,
          attention_mask=torch.ones_like(ids),
          max_new_tokens=n,
          min_new_tokens=n,
          do_sample=False,
          num_beams=1,
          use_cache=use_cache,
          pad_token_id=0,
        )

    out = run()
    result[f"hf {'cached' if use_cache else 'uncached'}"] = _median_time(run, args["runs"])
    if use_cache:
      result["tokens"] = [int(t) for t in out[0, len(args["prompt_ids"]) :]]
  result["versions"] = f"torch {torch.__version__}, transformers {transformers.__version__}"
  return result


def hf_bench(python: str, gguf: str, prompt_ids, new_tokens: int, runs: int, threads: int) -> dict | None:
  """The HF worker in `python` (None, with instructions printed, when it cannot run)."""
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

    python = sys.executable
  except ImportError:
    if not os.path.exists(python):
      print(
        f"--hf: torch/transformers are not importable here and {python} does not exist; "
        f"make that interpreter with:\n  {HF_VENV_HELP}",
        file=sys.stderr,
      )
      return None
  args = dict(gguf=gguf, prompt_ids=list(prompt_ids), new_tokens=new_tokens, runs=runs, threads=threads)
  proc = subprocess.run(
    [python, os.path.abspath(__file__), "--hf_worker", json.dumps(args)],
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode != 0:
    print(f"--hf: the worker in {python} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prompt_tokens", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--runs", type=int, default=3, help="timed runs per method (median)")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--hf", action="store_true", help="also time HF transformers (see above)")
  parser.add_argument(
    "--hf_python", default=DEFAULT_HF_PYTHON, help="interpreter with torch + transformers + gguf"
  )
  parser.add_argument("--hf_worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.hf_worker:
    print(json.dumps(hf_worker(json.loads(args.hf_worker))))
    return 0

  _limit_threads(args.threads)
  sys.path.insert(0, REPO_ROOT)
  from flamingo_jax import sources  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  gguf = sources.parse_lm("smollm2")[1]
  ids = tokenizer_lib.Tokenizer.from_gguf(sources.gguf_reader(gguf)).encode(PROMPT)
  if len(ids) < args.prompt_tokens:
    raise ValueError(f"the benchmark prompt has only {len(ids)} tokens")
  ids = ids[: args.prompt_tokens]

  times, tokens = jax_bench(ids, args.new_tokens, args.runs)
  if args.hf:
    hf = hf_bench(args.hf_python, gguf, ids, args.new_tokens, args.runs, args.threads)
    if hf is not None:
      match = hf.pop("tokens") == tokens
      print(f"HF ({hf.pop('versions')}): greedy tokens {'match' if match else 'DIFFER from'} the JAX ones")
      times.update(hf)

  print(
    f"SmolLM2-135M fp32, batch 1, {args.prompt_tokens} prompt + {args.new_tokens} new "
    f"tokens, {args.threads} threads, median of {args.runs} runs (prefill included), "
    f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
  )
  print(f"{'method':<22} {'wall s':>8} {'tokens/s':>9} {'ms/token':>9} {'CPU s':>8}")
  for name, (wall, cpu) in times.items():
    print(
      f"{name:<22} {wall:8.3f} {args.new_tokens / wall:9.1f} {1000 * wall / args.new_tokens:9.1f} {cpu:8.3f}"
    )
  ratio = times["jax uncached"][0] / times["jax cached"][0]
  cpu_ratio = times["jax uncached"][1] / times["jax cached"][1]
  print(f"KV cache speed-up (jax uncached / cached): {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU")
  if "hf cached" in times:
    print(
      f"jax cached vs hf cached: {times['hf cached'][0] / times['jax cached'][0]:.2f}x wall (> 1: JAX faster)"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
