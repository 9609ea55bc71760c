"""Input pipeline throughput: examples/s per dataset of the easy_vqa mixture on this machine.

  python benchmarks/data_throughput.py --data_dir /tmp/flamingo_tfds --steps 30
  python benchmarks/data_throughput.py --max_examples 256 --tokenizer bytes   # quick

Builds the easy_vqa datasets into --data_dir if missing (offline), then times each dataset's
pipeline alone (after --warmup steps), then the whole mixture (all datasets every step, as in
training). Prints one line per measurement; never asserted in tests. The tokenizer is SmolLM2's
(`flamingo_jax.data.tokenizer.Tokenizer.smollm2()`), or a byte-level stand-in with --tokenizer bytes.
"""

import argparse
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top


class ByteTokenizer:
  """UTF-8 bytes as ids 3..258 (0 pad, 1 BOS, 2 EOS); `<image>` = 259, `<EOC>` = 260."""

  pad_id, bos_id, eos_id, image_id, eoc_id, vocab_size = 0, 1, 2, 259, 260, 261
  _SPECIAL = re.compile(r"(<image>|<EOC>)")

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self._SPECIAL.split(text):
      if piece in ("<image>", "<EOC>"):
        ids.append(self.image_id if piece == "<image>" else self.eoc_id)
      else:
        ids += [b + 3 for b in piece.encode("utf-8")]
    return ids

  def decode(self, ids) -> str:
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")


def make_tokenizer(kind: str):
  if kind == "bytes":
    return ByteTokenizer()
  from flamingo_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  return Tokenizer.smollm2()


def timed(iterator, steps: int, warmup: int) -> float:
  """Seconds per step after `warmup` steps."""
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "flamingo_tfds"))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--max_examples", type=int, default=None)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--tokenizer", choices=("smollm2", "bytes"), default="smollm2")
  args = parser.parse_args()

  tokenizer = make_tokenizer(args.tokenizer)
  config = mixture.easy_vqa_mixture_config(args.max_examples, image_size=args.image_size)
  if args.tokenizer == "bytes":  # ~4x longer sequences than SmolLM2's BPE
    for ds in config.datasets.values():
      ds.max_tokens *= 4
  start = time.perf_counter()
  mixture.prepare_datasets(config, args.data_dir)
  print(f"prepare (build if missing): {time.perf_counter() - start:.1f} s in {args.data_dir}")

  with mixture.make_mixture(
    config, tokenizer, args.data_dir, seed=0, process_index=0, process_count=1
  ) as mix:
    for name, p in mix.pipelines.items():
      per_step = timed(p, args.steps, args.warmup)
      p.close()
      b = p.spec.batch_size
      print(
        f"{name:6s} {p.spec.kind:11s} batch {b:3d}  {b / per_step:8.1f} examples/s  "
        f"{1e3 * per_step:7.1f} ms/step  (N={p.spec.max_images} F={p.spec.num_frames} "
        f"S={p.spec.image.size} T={p.spec.max_tokens})"
      )
  with mixture.make_mixture(
    config, tokenizer, args.data_dir, seed=1, process_index=0, process_count=1
  ) as mix:
    per_step = timed(mix, args.steps, args.warmup)
    total = sum(p.spec.batch_size for p in mix.pipelines.values())
    print(
      f"mixture (all {len(mix.pipelines)} datasets per step): {1e3 * per_step:.1f} ms/step, "
      f"{total / per_step:.1f} examples/s"
    )
    print(f"drops: { {n: m['dropped'] for n, m in mix.metrics().items()} }")


if __name__ == "__main__":
  main()
