"""CIDEr-D (Vedantam et al. 2015) as computed by pycocoevalcap's CIDEr scorer, in pure Python/numpy.

For each evaluated id i with candidate c and references S_i (after `tokenize`):
  g_n(s)[w] = tf_s(w) * (log |I| - log max(1, df(w)))   for every n-gram w of s, n = 1..4,
where |I| is the number of evaluated ids and df(w) the number of ids whose references contain w
(document frequency over the references of the evaluated set, "corpus" mode). Then
  CIDEr_n(c, S_i) = 1/|S_i| sum_j exp(-(l_c - l_j)^2 / (2 sigma^2))
                    * sum_w min(g_n(c)[w], g_n(s_j)[w]) * g_n(s_j)[w] / (||g_n(c)|| ||g_n(s_j)||),
(a zero vector contributes 0; l = length in tokens; sigma = 6) and
  CIDEr-D(c, S_i) = 10 * mean_n CIDEr_n(c, S_i).
The corpus score is the mean over ids. pycocoevalcap measures l by the number of bigrams, which
differs from the token count by the same 1 on both sides whenever both sentences are non-empty;
an empty sentence has an all-zero vector, so the choice never changes a score.

CIDEr-D needs the whole evaluated set (df is corpus-wide): gather all predictions on one host
first. Tokenisation mimics the PTB tokenizer used by pycocoevalcap (lowercase, clitics split,
punctuation tokens dropped) without Java.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

Ngrams = collections.Counter  # n-gram tuple -> count

# Words (with inner hyphens, apostrophes or decimal points kept), PTB clitics, or any other symbol.
_TOKEN_RE = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-.][a-z0-9]+)*|\S")
_HAS_ALNUM = re.compile(r"[a-z0-9]")


def tokenize(text: str) -> list[str]:
  """PTB-like tokenisation: lowercase, split "n't"/"'s"-style clitics, drop punctuation-only tokens.

  >>> tokenize("A man's dog, isn't it?")
  ['a', 'man', "'s", 'dog', 'is', "n't", 'it']
  """
  text = text.lower().replace("\n", " ").replace("\t", " ")
  # Separate "n't" from its word before matching ("isn't" -> "is n't"), as PTB does.
  text = re.sub(r"(\w)n't\b", r"\1 n't", text)
  return [t for t in _TOKEN_RE.findall(text) if _HAS_ALNUM.search(t)]


def ngram_counts(tokens: Sequence[str], n: int) -> Ngrams:
  """Counts of all k-grams of `tokens` for k = 1..n (keys are tuples)."""
  counts = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i : i + k])] += 1
  return counts


def _tfidf(counts: Ngrams, df: Mapping[tuple, int], log_num_docs: float, n: int):
  """Per-order tf-idf vectors (dicts), their L2 norms [n], and the token length."""
  vecs = [dict() for _ in range(n)]
  norms = np.zeros([n])
  length = 0
  for ngram, tf in counts.items():
    order = len(ngram) - 1
    value = tf * (log_num_docs - math.log(max(1.0, df.get(ngram, 0))))
    vecs[order][ngram] = value
    norms[order] += value * value
    if order == 0:
      length += tf
  return vecs, np.sqrt(norms), length


def _similarity(cand, ref, sigma: float, n: int) -> np.ndarray:
  """Clipped cosine similarity per order [n] with the Gaussian length penalty."""
  vec_c, norm_c, len_c = cand
  vec_r, norm_r, len_r = ref
  penalty = math.exp(-((len_c - len_r) ** 2) / (2.0 * sigma**2))
  val = np.zeros([n])
  for k in range(n):
    dot = 0.0
    for ngram, value in vec_c[k].items():
      ref_value = vec_r[k].get(ngram, 0.0)
      dot += min(value, ref_value) * ref_value
    if norm_c[k] != 0.0 and norm_r[k] != 0.0:
      dot /= norm_c[k] * norm_r[k]
    val[k] = dot * penalty
  return val


def cider_d(
  predictions: Mapping[Hashable, str],
  references: Mapping[Hashable, Sequence[str]],
  *,
  n: int = 4,
  sigma: float = 6.0,
) -> tuple[float, dict[Hashable, float]]:
  """CIDEr-D of the predicted captions.

  Args:
    predictions: {id: predicted caption}.
    references: {id: [reference captions]}; must have exactly the ids of `predictions`.
    n: maximum n-gram order.
    sigma: standard deviation of the Gaussian length penalty.

  Returns:
    (corpus score = mean of the per-id scores, {id: score}); scores are x10 as in pycocoevalcap.
  """
  if set(predictions) != set(references):
    missing = sorted(map(str, set(predictions) - set(references)))[:5]
    extra = sorted(map(str, set(references) - set(predictions)))[:5]
    raise ValueError(
      "cider_d: predictions and references must have the same ids; ids without "
      f"references: {missing}, ids without a prediction: {extra}"
    )
  if not predictions:
    raise ValueError("cider_d: no predictions to score")
  ids = list(predictions)
  cand_counts, ref_counts = {}, {}
  for i in ids:
    refs = references[i]
    if isinstance(refs, str) or not refs:
      raise ValueError(f"cider_d: references[{i!r}] must be a non-empty list of strings, got {refs!r}")
    cand_counts[i] = ngram_counts(tokenize(predictions[i]), n)
    ref_counts[i] = [ngram_counts(tokenize(r), n) for r in refs]

  df = collections.Counter()
  for i in ids:
    df.update(set().union(*ref_counts[i]))
  log_num_docs = math.log(float(len(ids)))

  per_id = {}
  for i in ids:
    cand = _tfidf(cand_counts[i], df, log_num_docs, n)
    total = np.zeros([n])
    for ref in ref_counts[i]:
      total += _similarity(cand, _tfidf(ref, df, log_num_docs, n), sigma, n)
    per_id[i] = float(10.0 * np.mean(total) / len(ref_counts[i]))
  return float(np.mean(list(per_id.values()))), per_id
