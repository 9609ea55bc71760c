"""Tests for flamingo_jax.eval.prompting."""

import pytest

from flamingo_jax.eval import prompting
from flamingo_jax.eval.prompting import Example


def _vqa_examples():
  support = [Example(image=f"s{i}", question=f"q{i}?", answers=(f"a{i}", "other")) for i in range(4)]
  query = Example(image="query", question="What colour?", answers=("red",))
  return support, query


def test_vqa_prompt():
  support, query = _vqa_examples()
  text, refs = prompting.build_prompt(support[:2], query, "vqa")
  assert text == (
    "<image>Question: q0? Answer: a0<EOC><image>Question: q1? Answer: a1<EOC>"
    "<image>Question: What colour? Answer:"
  )
  assert refs == ["s0", "s1", "query"]


def test_captioning_and_classification_prompts():
  support = [Example(image=1, caption="A cat.", label="cat"), Example(image=2, caption="A dog.", label="dog")]
  query = Example(image=3)
  text, refs = prompting.build_prompt(support, query, "captioning")
  assert text == "<image>Output: A cat.<EOC><image>Output: A dog.<EOC><image>Output:"
  assert refs == [1, 2, 3]
  text, _ = prompting.build_prompt(support, query, "classification")
  assert text == "<image>Output: cat<EOC><image>Output: dog<EOC><image>Output:"


def test_zero_shot_text_only_support():
  support, query = _vqa_examples()
  text, refs = prompting.zero_shot_prompt(support[:2], query, "vqa")
  assert text == (
    "Question: q0? Answer: a0<EOC>Question: q1? Answer: a1<EOC><image>Question: What colour? Answer:"
  )
  assert refs == ["query"]
  assert text.count(prompting.IMAGE_TOKEN) == 1
  with pytest.raises(ValueError, match="exactly 2"):
    prompting.zero_shot_prompt(support[:3], query, "vqa")


def test_zero_shot_close_ended_prompt_is_the_query_alone():
  query = prompting.Example(image="query", label="cat")
  text, refs = prompting.zero_shot_prompt([], query, "classification")
  assert (text, refs) == ("<image>Output:", ["query"])
  with pytest.raises(ValueError, match="exactly 0"):
    prompting.zero_shot_prompt([query], query, "classification")


def test_shuffle_is_seeded_and_none_keeps_order():
  support, query = _vqa_examples()
  _, kept = prompting.build_prompt(support, query, "vqa")
  assert kept == ["s0", "s1", "s2", "s3", "query"]
  _, a = prompting.build_prompt(support, query, "vqa", shuffle_seed=3)
  _, b = prompting.build_prompt(support, query, "vqa", shuffle_seed=3)
  assert a == b
  assert sorted(a[:-1]) == ["s0", "s1", "s2", "s3"] and a[-1] == "query"
  orders = {tuple(prompting.build_prompt(support, query, "vqa", shuffle_seed=s)[1]) for s in range(10)}
  assert len(orders) > 1
  assert [e.image for e in support] == ["s0", "s1", "s2", "s3"]  # input left untouched


def test_permuted_prompts():
  support, query = _vqa_examples()
  prompts = prompting.permuted_prompts(support, query, "vqa", 3, seed=0)
  assert len(prompts) == 3
  assert prompts[0] == prompting.build_prompt(support, query, "vqa")
  assert all(p[1][-1] == "query" and sorted(p[1][:-1]) == ["s0", "s1", "s2", "s3"] for p in prompts)


def test_custom_template_and_separator():
  template = prompting.PromptTemplate(
    example="<image>Q: {question} A: {answer}<EOC>", query="<image>Q: {question} A:", separator="\n"
  )
  support, query = _vqa_examples()
  text, _ = prompting.build_prompt(support[:1], query, "vqa", template=template)
  assert text == "<image>Q: q0? A: a0<EOC>\n<image>Q: What colour? A:"
  with pytest.raises(ValueError, match="must start with"):
    prompting.PromptTemplate(example="Q: {question}<EOC>", query="<image>Q:")


def test_continuation():
  assert prompting.continuation("red") == " red<EOC>"


def test_errors_name_the_example():
  query = Example(image="q", question="?")
  with pytest.raises(ValueError, match="image 's' has no answers"):
    prompting.build_prompt([Example(image="s", question="?")], query, "vqa")
  with pytest.raises(ValueError, match="has no caption"):
    prompting.build_prompt([Example(image="s")], query, "captioning")
  with pytest.raises(ValueError, match="Unknown prompt task"):
    prompting.build_prompt([], query, "retrieval")
  with pytest.raises(ValueError, match="markers"):
    prompting.build_prompt([], Example(image="q", question="<image>?"), "vqa")


def test_random_support_excludes_query():
  pool = [Example(image=i, caption=str(i)) for i in range(5)]
  chosen = prompting.random_support(pool, 4, seed=0, exclude=2)
  assert len(chosen) == 4 and all(e.image != 2 for e in chosen)
  assert chosen == prompting.random_support(pool, 4, seed=0, exclude=2)
  with pytest.raises(ValueError, match="only 4"):
    prompting.random_support(pool, 5, seed=0, exclude=2)


def test_each_familys_own_prompts():
  """OpenFlamingo's evaluation prompts and IDEFICS's (its processor's fake tokens around each image,
  which the converted model holds in its `<EOC>` row; a newline ends an example)."""
  support = [prompting.Example(image="s", question="what?", answers=("red",))]
  query = prompting.Example(image="q", question="q2")
  text, refs = prompting.build_prompt(
    support, query, "vqa", template=prompting.template_for("vqa", "open_flamingo")
  )
  assert text == "<image>Question:what? Short answer:red<EOC><image>Question:q2 Short answer:" and refs == [
    "s",
    "q",
  ]
  idefics = prompting.template_for("vqa", "idefics")
  text, refs = prompting.build_prompt(support, query, "vqa", template=idefics)
  assert text == "<EOC><image><EOC>Question: what? Answer: red\n<EOC><image><EOC>Question: q2 Answer:"
  text, refs = prompting.zero_shot_prompt(support * 2, query, "vqa", template=idefics)
  assert text.count("<image>") == 1 and text.startswith("Question: what? Answer: red\n") and refs == ["q"]
  assert (
    prompting.continuation("cat", "classification", prompting.template_for("classification", "idefics"))
    == " cat\n"
  )
  assert prompting.continuation("cat", "vqa", prompting.template_for("vqa", "open_flamingo")) == "cat<EOC>"
  assert prompting.continuation("cat") == " cat<EOC>"
  with pytest.raises(ValueError, match="Unknown prompt format"):
    prompting.template_for("vqa", "blip")
