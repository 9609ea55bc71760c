"""Tests for flamingo_jax.eval.metrics.vqa."""

import itertools
import random

import pytest

from flamingo_jax.eval.metrics import vqa


@pytest.mark.parametrize(
  "raw, expected",
  [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("Yes!", "yes"),
    ("3.5", "3.5"),
    ("e.g. ten", "eg 10"),
    ("dont know", "don't know"),
    ("1,000", "1000"),
    ("black-white", "black white"),
    ("a ball (red)", "ball red"),
    ("  An apple\n", "apple"),
    ("none", "0"),
  ],
)
def test_normalize_answer(raw, expected):
  assert vqa.normalize_answer(raw) == expected


@pytest.mark.parametrize(
  "num_matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_ten_answer_accuracy(num_matches, expected):
  answers = ["yes"] * num_matches + ["no"] * (10 - num_matches)
  assert vqa.vqa_accuracy("Yes", answers) == pytest.approx(expected)


def _leave_one_out_reference(pred, answers):
  """Direct transcription: average over the 10 subsets of 9 answers of min(1, matches / 3)."""
  accs = []
  for left_out in range(len(answers)):
    subset = [a for i, a in enumerate(answers) if i != left_out]
    accs.append(min(1.0, sum(a == pred for a in subset) / 3))
  return sum(accs) / len(accs)


def test_matches_leave_one_out_subsets():
  rng = random.Random(0)
  words = ["red", "blue", "green", "2"]
  for _ in range(50):
    answers = [rng.choice(words) for _ in range(10)]
    pred = rng.choice(words)
    assert vqa.vqa_accuracy(pred, answers) == pytest.approx(_leave_one_out_reference(pred, answers))


def test_single_answer_is_exact_match_after_normalisation():
  assert vqa.vqa_accuracy("Two.", ["2"]) == 1.0
  assert vqa.vqa_accuracy("the circle", ["Circle"]) == 1.0
  assert vqa.vqa_accuracy("circle", ["triangle"]) == 0.0
  assert vqa.vqa_accuracy("circle", ["triangle", "circle"]) == 1.0


def test_official_unanimous_answers_are_not_normalised():
  # The official script normalises GT answers only when they disagree.
  assert vqa.vqa_accuracy("two", ["Two"] * 10) == 0.0
  assert vqa.vqa_accuracy("two", ["Two"] * 10, official=False) == 1.0
  assert vqa.vqa_accuracy("two", ["2"] * 10) == 1.0
  # Disagreeing answers go through the punctuation step only: "yes." == "yes", but "Yes" is not
  # lowercased, and "yes!" becomes "yes " (the official script does not strip after it).
  assert vqa.vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
  assert vqa.vqa_accuracy("yes", ["Yes"] * 3 + ["no"] * 7) == 0.0
  assert vqa.vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0
  assert vqa.vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7, official=False) == pytest.approx(0.9)


def test_bad_answers_raise():
  with pytest.raises(TypeError, match="list of strings"):
    vqa.vqa_accuracy("yes", "yes")
  with pytest.raises(ValueError, match="at least one"):
    vqa.vqa_accuracy("yes", [])


def test_accumulator_sums_across_hosts():
  data = [("yes", ["yes"] * 10), ("no", ["yes"] * 10), ("2", ["two"]), ("blue", ["blue"] * 2 + ["x"] * 8)]
  hosts = [vqa.VQAAccumulator(), vqa.VQAAccumulator()]
  for i, (pred, answers) in enumerate(data):
    hosts[i % 2].add(pred, answers)
  merged = vqa.VQAAccumulator().merge([h.stats() for h in hosts])
  expected = [1.0, 0.0, 1.0, 0.6]
  assert merged.stats()["count"] == 4
  assert merged.result() == pytest.approx(sum(expected) / 4)
  # A per-host mean of means would differ when hosts hold different counts.
  hosts[0].add("yes", ["yes"])
  total = vqa.VQAAccumulator().merge([h.stats() for h in hosts])
  assert total.result() == pytest.approx((sum(expected) + 1) / 5)


def test_accumulator_errors():
  with pytest.raises(ValueError, match="before any question"):
    vqa.VQAAccumulator().result()
  with pytest.raises(KeyError, match="count"):
    vqa.VQAAccumulator().merge([{"sum": 1.0}])


@pytest.mark.parametrize(
  "text, expected",
  [
    (" yes<EOC><image>Question:", "yes"),
    (" red\nQuestion: what", "red"),
    (" blue Question: what", "blue"),
    ("  two dogs  ", "two dogs"),
    ("<EOC>", ""),
  ],
)
def test_postprocess_generation(text, expected):
  assert vqa.postprocess_generation(text) == expected


def test_permutation_invariance_of_answers():
  answers = ["yes"] * 3 + ["no"] * 6 + ["maybe"]
  scores = {
    vqa.vqa_accuracy("yes", list(p)) for p in itertools.islice(itertools.permutations(answers), 0, 2000, 97)
  }
  assert len(scores) == 1
