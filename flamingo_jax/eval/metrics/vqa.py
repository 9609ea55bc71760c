"""VQA accuracy with the official answer normalisation (VQA v2 evaluation script, `vqaEval.py`).

Normalisation (`normalize_answer`), exactly as in the official script:
  1. newlines/tabs -> spaces, strip;
  2. punctuation: each of `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is deleted when it touches
     a space in the text (or the text has a digit-comma-digit pattern such as "1,000"), otherwise
     it is replaced by a space; then every period not followed by a digit is deleted (the official
     regex, typo included: "(?!<=\\d)(\\.)(?!\\d)", so "3.5" keeps its period, "e.g." -> "eg");
  3. lowercase, split on whitespace; number words "none", "zero".."ten" -> digits; the articles
     "a", "an", "the" are dropped; the contractions table restores apostrophes ("dont" -> "don't").

Accuracy (`vqa_accuracy`) for 10 ground-truth answers (VQA v2, OK-VQA, VizWiz, TextVQA):
  acc = mean over the 10 subsets that leave one GT answer out of min(1, #matches in the subset / 3).
Like the official script (GT-Vision-Lab `vqaEval.py`, as used by OpenFlamingo), the prediction
is always fully normalised, while the GT answers only go through the punctuation step and only
when they disagree (the released annotations are already normalised); `official=False` fully
normalises the GT answers too. With fewer than 10 answers (e.g. one answer per question as in
easy_vqa) the leave-one-out formula is meaningless (one answer always gives 0), so the accuracy is
exact match, after full normalisation of both sides, against any of the given answers.

Hosts sum sufficient statistics (`VQAAccumulator.stats()` -> {'sum', 'count'}), never per-host
means.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping, Sequence

NUM_OFFICIAL_ANSWERS = 10

CONTRACTIONS = types.MappingProxyType(
  {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
  }
)
NUMBER_WORDS = types.MappingProxyType(
  {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
  }
)
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (
  ";",
  "/",
  "[",
  "]",
  '"',
  "{",
  "}",
  "(",
  ")",
  "=",
  "+",
  "\\",
  "_",
  "-",
  ">",
  "<",
  "@",
  "`",
  ",",
  "?",
  "!",
)
# Verbatim from the official script (the intended look-behind is written "(?!<=\d)").
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
DEFAULT_STOP_STRINGS = ("<EOC>", "\n", "Question:")


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`."""
  out = text
  has_digit_comma = _COMMA_STRIP.search(text) is not None
  for p in PUNCTUATION:
    if (p + " " in text or " " + p in text) or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`: number words -> digits, drop articles, contractions."""
  words = []
  for word in text.lower().split():
    word = NUMBER_WORDS.get(word, word)
    if word not in ARTICLES:
      words.append(CONTRACTIONS.get(word, word))
  return " ".join(words)


def normalize_answer(text: str) -> str:
  """Full official normalisation of one answer string."""
  return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, official: bool = True) -> float:
  """VQA accuracy in [0, 1] of one predicted answer against the ground-truth answers.

  Args:
    prediction: the model's answer (already post-processed, see `postprocess_generation`).
    answers: the ground-truth answers (10 for VQA v2; one for single-answer sets).
    official: with >= 10 answers, treat the GT answers as the official script does (punctuation step
      only, only when they disagree); False fully normalises them.
  """
  if isinstance(answers, str):
    raise TypeError(f"answers must be a list of strings, got the string {answers!r}")
  if not answers:
    raise ValueError("vqa_accuracy needs at least one ground-truth answer, got none")
  pred = normalize_answer(prediction)
  if len(answers) < NUM_OFFICIAL_ANSWERS:
    return float(any(pred == normalize_answer(a) for a in answers))
  if not official:
    gts = [normalize_answer(a) for a in answers]
  elif len(set(answers)) > 1:
    gts = [process_punctuation(a) for a in answers]
  else:
    gts = list(answers)
  matches = [gt == pred for gt in gts]
  total_matches = sum(matches)
  # Leaving GT answer i out leaves total_matches - matches[i] matching answers.
  accs = [min(1.0, (total_matches - m) / 3.0) for m in matches]
  return sum(accs) / len(accs)


def postprocess_generation(text: str, stop_strings: Iterable[str] = DEFAULT_STOP_STRINGS) -> str:
  """Cuts generated text at the first stop string (`<EOC>`, newline, "Question:") and strips it."""
  cut = len(text)
  for stop in stop_strings:
    pos = text.find(stop)
    if pos != -1:
      cut = min(cut, pos)
  return text[:cut].strip()


class VQAAccumulator:
  """Sums VQA accuracies; `stats()` are summable across hosts, `merge` adds gathered stats."""

  def __init__(self, *, official: bool = True):
    self._official = official
    self._sum = 0.0
    self._count = 0

  def add(self, prediction: str, answers: Sequence[str]) -> float:
    """Adds one question; returns its accuracy."""
    acc = vqa_accuracy(prediction, answers, official=self._official)
    self._sum += acc
    self._count += 1
    return acc

  def stats(self) -> dict[str, float]:
    """Sufficient statistics {'sum': float, 'count': int} of the questions added here."""
    return {"sum": self._sum, "count": self._count}

  def merge(self, stats_list: Iterable[Mapping[str, float]]) -> VQAAccumulator:
    """Adds other accumulators' `stats()` (e.g. gathered from other hosts) into this one."""
    for i, stats in enumerate(stats_list):
      missing = {"sum", "count"} - set(stats)
      if missing:
        raise KeyError(f"VQA stats #{i} lacks the key(s) {sorted(missing)}: {dict(stats)}")
      self._sum += float(stats["sum"])
      self._count += int(stats["count"])
    return self

  def result(self) -> float:
    """Mean accuracy in [0, 1] over all questions added or merged."""
    if self._count == 0:
      raise ValueError("VQAAccumulator.result() called before any question was added")
    return self._sum / self._count
