"""Tests for flamingo_jax.eval.metrics.cider."""

import math
import random

import pytest

from flamingo_jax.eval.metrics import cider


def _reference_cider_d(predictions, references, n=4, sigma=6.0):
  """Independent re-implementation of the paper's formulas with plain dict loops.

  Sentences are whitespace-split (the test corpus is lowercase words only). For an n-gram w of
  order n, with h(s, w) its count in s (pycocoevalcap uses raw counts as tf):
    g(s)[w] = h(s, w) * log(|I| / max(1, sum_p min(1, sum_q h(s_pq, w))))
    CIDEr-D_n(c, S) = 10/m sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                      * sum_w min(g(c)[w], g(s_j)[w]) g(s_j)[w] / (||g(c)|| ||g(s_j)||)
    CIDEr-D = mean over n = 1..4 of CIDEr-D_n.
  """
  ids = sorted(predictions)
  num_images = len(ids)

  def grams(words, order):
    out = {}
    for i in range(len(words) - order + 1):
      key = " ".join(words[i : i + order])
      out[key] = out.get(key, 0) + 1
    return out

  def doc_count(gram, order):
    total = 0
    for other in ids:
      present = 0
      for ref in references[other]:
        present += grams(ref.split(), order).get(gram, 0)
      total += min(1, present)
    return total

  def g_vector(words, order):
    return {w: h * math.log(num_images / max(1, doc_count(w, order))) for w, h in grams(words, order).items()}

  scores = {}
  for i in ids:
    cand = predictions[i].split()
    per_order = []
    for order in range(1, n + 1):
      gc = g_vector(cand, order)
      norm_c = math.sqrt(sum(v * v for v in gc.values()))
      acc = 0.0
      for ref_text in references[i]:
        ref = ref_text.split()
        gr = g_vector(ref, order)
        norm_r = math.sqrt(sum(v * v for v in gr.values()))
        dot = sum(min(v, gr.get(w, 0.0)) * gr.get(w, 0.0) for w, v in gc.items())
        cos = dot / (norm_c * norm_r) if norm_c > 0 and norm_r > 0 else 0.0
        acc += math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2)) * cos
      per_order.append(10.0 * acc / len(references[i]))
    scores[i] = sum(per_order) / n
  return sum(scores.values()) / len(scores), scores


def test_hand_computed_identical():
  # idf("a") = log(2/2) = 0; "cat", "dog", "a cat", "a dog": log 2. Orders 1 and 2 have cosine 1,
  # orders 3 and 4 have no n-grams: score = 10 * (1 + 1 + 0 + 0) / 4 = 5.
  score, per_id = cider.cider_d({1: "a cat", 2: "a dog"}, {1: ["a cat"], 2: ["a dog"]})
  assert per_id == pytest.approx({1: 5.0, 2: 5.0})
  assert score == pytest.approx(5.0)


def test_hand_computed_clipping():
  # Candidate "cat cat": g1 = {cat: 2 log2}; ref "a cat": g1 = {a: 0, cat: log2}.
  # Clipped dot = min(2 log2, log2) * log2 = log2^2; norms 2 log2 and log2 -> 0.5 (1.0 unclipped).
  # Bigram "cat cat" is not in the reference -> 0. Same length. Score = 10 * 0.5 / 4 = 1.25.
  _, per_id = cider.cider_d({1: "cat cat", 2: "a dog"}, {1: ["a cat"], 2: ["a dog"]})
  assert per_id[1] == pytest.approx(1.25)


def test_hand_computed_length_penalty():
  # Candidate "cat" vs ref "a cat": unigram cosine 1, no bigrams, length gap 1:
  # 10 * exp(-1 / 72) * 1 / 4.
  _, per_id = cider.cider_d({1: "cat", 2: "a dog"}, {1: ["a cat"], 2: ["a dog"]})
  assert per_id[1] == pytest.approx(2.5 * math.exp(-1 / 72))


def test_single_image_scores_zero():
  # With one image every reference n-gram has df = |I|: all idf weights are 0.
  score, _ = cider.cider_d({0: "a cat"}, {0: ["a cat"]})
  assert score == 0.0


def _random_corpus(seed):
  rng = random.Random(seed)
  vocab = [
    "a",
    "the",
    "cat",
    "dog",
    "man",
    "sits",
    "on",
    "red",
    "blue",
    "table",
    "grass",
    "runs",
    "with",
    "ball",
  ]

  def sentence():
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9)))

  references = {i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(8)}
  predictions = {}
  for i in range(8):
    if i % 3 == 0:  # Partly copied from a reference, so that higher-order n-grams match.
      words = rng.choice(references[i]).split()
      predictions[i] = " ".join(words[: max(1, len(words) - 1)] + [rng.choice(vocab)])
    else:
      predictions[i] = sentence()
  predictions[7] = ""  # An empty caption scores 0.
  return predictions, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_implementation(seed):
  predictions, references = _random_corpus(seed)
  score, per_id = cider.cider_d(predictions, references)
  ref_score, ref_per_id = _reference_cider_d(predictions, references)
  assert score == pytest.approx(ref_score, abs=1e-6)
  for i in predictions:
    assert per_id[i] == pytest.approx(ref_per_id[i], abs=1e-6)
  assert per_id[7] == 0.0
  assert score > 0.0


def test_identical_beats_unrelated():
  references = {
    0: ["a man riding a horse on a beach", "a person rides a horse near the sea"],
    1: ["two dogs play with a red ball", "dogs playing with a ball in the park"],
    2: ["a plate of food with broccoli", "a dish with vegetables and rice"],
  }
  identical = {i: refs[0] for i, refs in references.items()}
  unrelated = {
    0: "a plate of food with broccoli",
    1: "a man riding a horse on a beach",
    2: "two dogs play with a red ball",
  }
  good, good_per_id = cider.cider_d(identical, references)
  bad, bad_per_id = cider.cider_d(unrelated, references)
  assert good > bad
  assert all(good_per_id[i] > bad_per_id[i] for i in references)


def test_tokenize_ptb_like():
  assert cider.tokenize("A Man's dog, isn't it?") == ["a", "man", "'s", "dog", "is", "n't", "it"]
  assert cider.tokenize("black-and-white photo of 3.5 cats.") == [
    "black-and-white",
    "photo",
    "of",
    "3.5",
    "cats",
  ]
  # Punctuation does not change the score.
  a, _ = cider.cider_d({1: "A cat.", 2: "a dog"}, {1: ["a cat"], 2: ["A dog!"]})
  b, _ = cider.cider_d({1: "a cat", 2: "a dog"}, {1: ["a cat"], 2: ["a dog"]})
  assert a == pytest.approx(b)


def test_mismatched_ids_raise():
  with pytest.raises(ValueError, match="same ids"):
    cider.cider_d({1: "a cat", 3: "x"}, {1: ["a cat"], 2: ["a dog"]})
  with pytest.raises(ValueError, match="non-empty list"):
    cider.cider_d({1: "a cat"}, {1: "a cat"})
