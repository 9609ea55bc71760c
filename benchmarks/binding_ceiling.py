"""How well can the frozen SmolLM2 bind invented names at all, given perfect class information as text?

    python benchmarks/binding_ceiling.py [--episodes 200] [--cells 2x1,5x1] [--conditions plain,replace]

The in-context binding evaluation (`eval/binding.py`) asks the model to continue `<image>This is a` with
the name that the support gave the query's class. Through the gated xattn blocks the image can only
change what the frozen LM's own attention reads; the name must be found by the LM's in-context copying
(induction). This script measures that copying on text prompts in the evaluation's template, with the
class given to the LM in different ways, so that the binding accuracy an image pathway could reach is
bounded by what the same LM does with the class spelt out:

  plain       `This is a dax.` ... `This is a`: no class information; chance.
  described   `Picture: red circle. This is a dax.` ...: the class four tokens before the name.
  adjacent    `This is a red-circle dax.` ...: the class words right before the name.
  replace     `This is apple dax.` ...: a distinct one-token word per class in place of `a`, right
              before the name: the best case of a class signature at the token the name follows.
  add:ALPHA   `a` with ALPHA x the embedding of that word added to its own embedding (what a block
              before layer 0 could write at that position).

Episodes: N easy-VQA classes (colour and shape), names from the packaged evaluation word list, K
support lines per class in shuffled order, one query; close-ended: the N names ranked by the LM's
log-likelihood of ` {name}.` (the issue's ranked variant). Deterministic from (cell, seed). Prints
accuracy per cell and condition, chance and the `plain` baseline of the same run.
"""

import argparse
import os
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import main_job  # noqa: E402
from flamingo_jax import pretrained  # noqa: E402
from flamingo_jax.data import binding  # noqa: E402
from flamingo_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from flamingo_jax.data.builders import easy_vqa_facts  # noqa: E402
from flamingo_jax.models import flamingo  # noqa: E402

# One-token English nouns, one per class (24 = 8 colours x 3 shapes): distinct keys for induction.
SIGNATURES = [
  "",
  "apple",
  "river",
  "chair",
  "moon",
  "horse",
  "guitar",
  "bread",
  "cloud",
  "tiger",
  "lamp",
  "rocket",
  "piano",
  "garden",
  "forest",
  "bottle",
  "castle",
  "pencil",
  "window",
  "candle",
  "mirror",
  "ladder",
  "basket",
  "hammer",
  "ribbon",
][1:]
CLASSES = tuple(f"{c} {s}" for c in easy_vqa_facts.COLORS for s in easy_vqa_facts.SHAPES)


def _args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--episodes", type=int, default=200)
  parser.add_argument("--cells", default="2x1,5x1", help="N x K cells, comma-separated")
  parser.add_argument("--conditions", default="plain,described,adjacent,replace,add:1,add:4")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


class Prompts:
  """Token ids of support and query lines under each condition (`spare` ids carry the add:ALPHA rows)."""

  def __init__(self, tokenizer, vocab_size: int):
    self.tok = tokenizer
    self.signature_ids = [self._one(" " + w) for w in SIGNATURES]
    self.a_id = self._one(" a")
    self.spare = list(range(vocab_size - len(CLASSES), vocab_size))  # rare byte merges, overwritten
    self.before = binding.EVAL_TEMPLATE[0]  # 'This is a'

  def _one(self, text: str) -> int:
    ids = self.tok.encode(text)
    if len(ids) != 1:
      raise ValueError(f"{text!r} is {len(ids)} tokens; signatures must be one token")
    return ids[0]

  def prefix(self, condition: str, cls: int) -> list[int]:
    """The line up to the name for class `cls`."""
    head = self.before.rsplit(" ", 1)[0]  # 'This is'
    if condition == "plain":
      return self.tok.encode(self.before)
    if condition == "described":
      return self.tok.encode(f"Picture: {CLASSES[cls]}. {self.before}")
    if condition == "adjacent":
      return self.tok.encode(f"{self.before} {CLASSES[cls].replace(' ', '-')}")
    if condition == "replace":
      return self.tok.encode(head) + [self.signature_ids[cls]]
    return self.tok.encode(head) + [self.spare[cls]]  # add:ALPHA

  def name(self, name: str) -> list[int]:
    return self.tok.encode(f" {name}.\n")


def with_added_signatures(params: dict, prompts: Prompts, alpha: float) -> dict:
  """params whose spare rows are embed(' a') + alpha * embed(signature of class c)."""
  table = np.array(params["lm/embed"]["embeddings"])
  for c, row in enumerate(prompts.spare):
    table[row] = table[prompts.a_id] + alpha * table[prompts.signature_ids[c]]
  return {**params, "lm/embed": {"embeddings": jnp.asarray(table)}}


def main():
  args = _args()
  config = main_job.get_config("")
  params = pretrained.init_flamingo_with_lm(config.model, "smollm2", jax.random.PRNGKey(0), text_only=True)
  model = flamingo.make_model(config.model)
  prompts = Prompts(tokenizer_lib.Tokenizer.smollm2(), config.model.lm.vocab_size)
  names = binding.read_word_list(binding.default_word_list("eval"))

  @jax.jit
  def score(p, tokens, mask):
    """Sum of log p(token) over the masked positions of each row: [N, L] -> [N]."""
    logits = model.lm_forward(p, None, tokens, lm_only=True)[0][:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0] * mask[:, 1:], axis=-1)

  def accuracy(condition: str, p: dict, n_way: int, k_shot: int) -> float:
    rng = random.Random(f"{args.seed}/{n_way}/{k_shot}")
    correct = 0
    for _ in range(args.episodes):
      classes, picked = rng.sample(range(len(CLASSES)), n_way), rng.sample(names, n_way)
      support = [(c, n) for c, n in zip(classes, picked) for _ in range(k_shot)]
      rng.shuffle(support)
      query = rng.randrange(n_way)
      context = [t for c, n in support for t in prompts.prefix(condition, c) + prompts.name(n)]
      context += prompts.prefix(condition, classes[query])
      candidates = [prompts.tok.encode(f" {n}.") for n in picked]
      length = -(-(len(context) + max(map(len, candidates))) // 64) * 64  # few shapes, few compiles
      tokens, mask = np.zeros((n_way, length), np.int32), np.zeros((n_way, length), np.float32)
      for i, cand in enumerate(candidates):
        tokens[i, : len(context) + len(cand)] = context + cand
        mask[i, len(context) : len(context) + len(cand)] = 1.0
      correct += int(np.argmax(np.asarray(score(p, jnp.asarray(tokens), jnp.asarray(mask))))) == query
    return 100.0 * correct / args.episodes

  cells = [tuple(int(x) for x in cell.split("x")) for cell in args.cells.split(",")]
  print(f"frozen SmolLM2-135M, close-ended, {args.episodes} episodes per cell, seed {args.seed}")
  print(f"{'condition':12s}" + "".join(f"{f'{n}-way {k}-shot':>14s}" for n, k in cells))
  print(f"{'chance':12s}" + "".join(f"{100 / n:14.0f}" for n, _ in cells))
  for condition in args.conditions.split(","):
    start = time.time()
    p = (
      with_added_signatures(params, prompts, float(condition[4:])) if condition.startswith("add:") else params
    )
    row = [accuracy(condition, p, n, k) for n, k in cells]
    print(
      f"{condition:12s}" + "".join(f"{a:14.1f}" for a in row) + f"   ({time.time() - start:.0f} s)",
      flush=True,
    )


if __name__ == "__main__":
  main()
