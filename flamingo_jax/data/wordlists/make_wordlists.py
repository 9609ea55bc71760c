"""Writes `train.txt` and `eval.txt`: invented words for the in-context binding task.

    python -m flamingo_jax.data.wordlists.make_wordlists

A word is a CVC or CVCV string over common letters that the SmolLM2 tokenizer splits into exactly two
tokens after a space (a single token would mark a real, frequent word). Each word has its own first
token, so two names of one episode never share a prefix, and the training and evaluation lists share
no first token either: a held-out name is new to the trained weights down to its first token.
"""

import itertools
import os
import random

from flamingo_jax.data import tokenizer as tokenizer_lib

CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
EVAL_FRACTION = 0.3


def candidates() -> list[str]:
  cvc = ("".join(p) for p in itertools.product(CONSONANTS, VOWELS, CONSONANTS))
  cvcv = ("".join(p) for p in itertools.product(CONSONANTS, VOWELS, CONSONANTS, VOWELS))
  return sorted(set(cvc) | set(cvcv))


def main():
  tokenizer = tokenizer_lib.Tokenizer.smollm2()
  by_first: dict[int, list[str]] = {}
  for word in candidates():
    ids = tokenizer.encode(" " + word)
    if len(ids) == 2:
      by_first.setdefault(ids[0], []).append(word)
  rng = random.Random(0)
  words = [rng.choice(ws) for _, ws in sorted(by_first.items())]
  rng.shuffle(words)
  n_eval = int(len(words) * EVAL_FRACTION)
  folder = os.path.dirname(os.path.abspath(__file__))
  for name, part in (("eval", words[:n_eval]), ("train", words[n_eval:])):
    with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
      f.write("".join(w + "\n" for w in sorted(part)))
    print(f"{name}.txt: {len(part)} words")


if __name__ == "__main__":
  main()
