"""Tests of flamingo_jax.eval.evaluators on the tiny model with a byte-level tokenizer.

The data are synthetic (random images, fixed-length questions and answers) so that every run below
has the same padded prompt length: decoding compiles once per number of media (N = 1 zero-shot,
N = 3 two-shot) and `chex.assert_max_traces` on the shared EvalModel turns any retrace into a
failure. One test builds the easy_vqa `vqa` config with a few examples (TFDS, no model).
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.eval import engine, evaluators, fewshot_data, prompting
from flamingo_jax.eval.metrics import vqa as vqa_lib
from flamingo_jax.models import masking
from tests.data.data_helpers import image_bytes
from tests.models import helpers

S = 32  # tiny model image side
NEW = 4  # max_new_tokens everywhere (shared compilations)
BUCKET = 256  # every prompt below pads to 256 tokens
COLORS = ("red", "tan", "sky")  # equal lengths: equal prompt lengths


@pytest.fixture(scope="module")
def model_and_params(tok):
  model, params = helpers.tiny_eval_model(tok.vocab_size, S)
  return model, params, helpers.open_gates(params, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def eval_model(model_and_params, tok):
  """Shared by the tests: at most 2 traces per function (N = 1 and N = 3; images and video)."""
  return engine.EvalModel(
    model_and_params[0], tok, batch_size=4, num_beams=1, image_batch_size=8, max_traces=2
  )


def _media(seed, frames=1):
  return np.random.default_rng(seed).uniform(size=(frames, S, S, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def vqa_data():
  """12 support examples (3 per medium), 6 queries; support medium dup/i has query i's pixels;
  the support pool also holds an example on query 0's own medium (never selectable for it)."""
  media = {f"train/{i}": _media(i) for i in range(4)}
  media.update({f"test/{i}": _media(100 + i) for i in range(6)})
  media.update({f"dup/{i}": _media(100 + i) for i in range(6)})
  q = "what color is it?"
  support = [
    prompting.Example(image=f"train/{i % 4}", question=q, answers=(COLORS[i % 3],)) for i in range(12)
  ]
  support += [prompting.Example(image=f"dup/{i}", question=q, answers=(COLORS[i % 3],)) for i in range(6)]
  support.append(prompting.Example(image="test/0", question=q, answers=("red",)))
  queries = [prompting.Example(image=f"test/{i}", question=q, answers=(COLORS[i % 3],)) for i in range(6)]
  return fewshot_data.FewShotData(
    "toy_vqa", support, queries, [e.answers for e in queries], media.__getitem__
  )


def test_bucket_and_left_pad():
  assert [engine.bucket(n, 32) for n in (1, 32, 33)] == [32, 32, 64]
  tokens, mask = engine._left_pad([[5, 6], [7]], 4, 0)
  np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [0, 0, 0, 7]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match="5 tokens"):
    engine._left_pad([[1] * 5], 4, 0)


def test_generate_matches_uncached_greedy(eval_model, model_and_params, tok):
  """KV-cache decoding (left padding, last-medium cache, batched media) == full forwards."""
  model, _, params = model_and_params
  _check_generate_matches_uncached(eval_model, model, params, tok)


def test_generate_matches_uncached_greedy_with_the_mlp_resampler(tok):
  """The resampler ablation gives F*Lv visual tokens per medium, not R: the cache follows them."""
  model, params = helpers.tiny_eval_model(tok.vocab_size, S, resampler_kind="mlp")
  params = helpers.open_gates(params, jax.random.PRNGKey(1))
  assert (
    model.encode_media(params, None, jnp.zeros((1, 1, 1, S, S, 3))).shape[2]
    != model.configs.resampler.num_latents
  )
  eval_model = engine.EvalModel(model, tok, batch_size=4, num_beams=1, image_batch_size=8, max_traces=1)
  _check_generate_matches_uncached(eval_model, model, params, tok)


def _check_generate_matches_uncached(eval_model, model, params, tok):
  rng = np.random.default_rng(0)
  prompts, media = [], []
  for b in range(4):
    ids = [tok.bos_id]
    for _ in range(3):
      ids += [tok.image_id] + rng.integers(3, 200, size=int(rng.integers(3, 9))).tolist()
    prompts.append(ids)
    media.append([f"m{b}", f"m{(b + 1) % 4}", f"m{b + 10}"])  # media shared across rows
  images = {f"m{i}": _media(i) for i in list(range(4)) + list(range(10, 14))}
  out = eval_model.generate(params, prompts, media, images.__getitem__, prompt_len=BUCKET, max_new_tokens=NEW)
  # Reference: right-padded uncached forwards (causal: later tokens never change earlier logits).
  length = max(map(len, prompts)) + NEW
  refs = sorted(images)
  encoded = eval_model.encode(params, refs, images.__getitem__)  # [U, R, Dr]
  visual = jnp.stack([jnp.stack([encoded[refs.index(r)] for r in row]) for row in media])
  seqs = [list(p) for p in prompts]
  done = [False] * 4
  forward = jax.jit(lambda p, t, v, phi: model.lm_forward(p, None, t, v, phi, None, None, False)[0])
  for _ in range(NEW):
    tokens = np.zeros([4, length], np.int32)
    for b, s in enumerate(seqs):
      tokens[b, : len(s)] = s
    phi = masking.media_index_from_tokens(jnp.asarray(tokens), tok.image_id)
    logits = np.asarray(forward(params, tokens, visual, phi))
    for b in range(4):
      if not done[b]:
        nxt = int(np.argmax(logits[b, len(seqs[b]) - 1]))
        seqs[b].append(nxt)
        done[b] = nxt in eval_model.stop_ids
  for b in range(4):
    expected = [t for t in seqs[b][len(prompts[b]) :] if t not in eval_model.stop_ids]
    assert out[b] == expected[: len(out[b])] and len(out[b]) == len(expected), b


def test_vqa_random_rices_zero_shot_without_retracing(eval_model, model_and_params, vqa_data, tok, tmp_path):
  params = model_and_params[2]
  ev = evaluators.VQAEvaluator(vqa_data, max_new_tokens=NEW, prompt_bucket=BUCKET)
  kw = dict(rices_dir=str(tmp_path / "rices"), model_id="test")
  zero = dict(ev.run(eval_model, params, tok, shots=0, seed=0, **kw))
  assert zero["num_queries"] == 6 and 0.0 <= zero["accuracy"] <= 100.0
  for record in ev.predictions:  # two text-only examples, then the query's image
    assert len(record["support"]) == 2 and record["prompt"].count("<image>") == 1
  runs = {}
  for selection, seed in (("random", 0), ("random", 1), ("rices", 0), ("rices", 1)):
    metrics = dict(ev.run(eval_model, params, tok, shots=2, selection=selection, seed=seed, **kw))
    accs = [vqa_lib.vqa_accuracy(r["prediction"], r["references"]) for r in ev.predictions]
    assert metrics["accuracy"] == pytest.approx(100.0 * np.mean(accs))
    runs[selection, seed] = [r["support"] for r in ev.predictions]
    for q, record in enumerate(ev.predictions):
      assert record["prompt"].count("<image>") == 3
      if selection == "rices":
        assert record["support"][-1] == f"dup/{q}"  # identical pixels: most similar, last
      assert f"test/{q}" not in record["support"]  # never the query itself
  assert runs["random", 0] != runs["random", 1]
  assert len(list((tmp_path / "rices").glob("rices_*.npz"))) == 1


def test_text_only_equals_flamingo_with_closed_gates(eval_model, model_and_params, vqa_data, tok):
  _, init_params, params = model_and_params  # gates at 0: Flamingo computes exactly the LM
  ev = evaluators.VQAEvaluator(
    vqa_data, max_new_tokens=NEW, prompt_bucket=BUCKET, text_only_format="flamingo"
  )  # the identical token sequence
  dict(ev.run(eval_model, init_params, tok, shots=2, seed=3))
  flamingo_preds = [r["prediction"] for r in ev.predictions]
  dict(ev.run(eval_model, init_params, tok, shots=2, seed=3, lm_only=True))
  assert [r["prediction"] for r in ev.predictions] == flamingo_preds
  # The default text-only format: the same examples as plain text, stopping at a newline.
  ev = evaluators.VQAEvaluator(vqa_data, max_new_tokens=NEW, prompt_bucket=BUCKET)
  dict(ev.run(eval_model, params, tok, shots=2, seed=3, lm_only=True))
  for record in ev.predictions:
    assert "<image>" not in record["prompt"] and "<EOC>" not in record["prompt"]
    assert record["prompt"].count("\n") == 2 and "\n" not in record["prediction"]


def test_captioning_cider_and_video_frames(eval_model, model_and_params, tok):
  params = model_and_params[2]
  media = {f"v{i}": _media(i, frames=6) for i in range(10)}  # > the 4 trained frames
  support = [prompting.Example(image=f"v{i}", caption=f"a {COLORS[i % 3]} one") for i in range(6)]
  queries = [prompting.Example(image=f"v{i}") for i in range(6, 10)]
  refs = [(f"a {COLORS[i % 3]} one", "a shape") for i in range(6, 10)]
  data = fewshot_data.FewShotData("toy_video", support, queries, refs, media.__getitem__)
  ev = evaluators.CaptionEvaluator(data, max_new_tokens=NEW, prompt_bucket=BUCKET)
  metrics = dict(ev.run(eval_model, params, tok, shots=2, seed=0))
  assert metrics["num_queries"] == 4 and metrics["cider"] >= 0.0
  assert {"cider", "prediction", "references"} <= set(ev.predictions[0])


def test_classification_ranks_the_answer_set_over_permutations(eval_model, model_and_params, tok):
  params = model_and_params[2]
  media = {f"i{i}": _media(i) for i in range(12)}
  support = [prompting.Example(image=f"i{i}", label=COLORS[i % 3]) for i in range(8)]
  queries = [prompting.Example(image=f"i{i}") for i in range(8, 12)]
  data = fewshot_data.FewShotData(
    "toy_cls",
    support,
    queries,
    [(COLORS[i % 3],) for i in range(8, 12)],
    media.__getitem__,
    candidates=COLORS,
  )
  ev = evaluators.ClassificationEvaluator(data, prompt_bucket=BUCKET, num_prompts=2)
  metrics = dict(ev.run(eval_model, params, tok, shots=2, seed=0))
  correct = [r["prediction"] == r["references"][0] for r in ev.predictions]
  assert metrics["accuracy"] == pytest.approx(100.0 * np.mean(correct))
  for r in ev.predictions:
    assert set(r["scores"]) == set(COLORS)
    assert r["prediction"] == max(r["scores"], key=r["scores"].get)
  assert ev.predictions[0]["prompt"].count("<image>") == 3
  json.dumps(ev.predictions)  # JSON-able records
  dict(ev.run(eval_model, params, tok, shots=0, seed=0))
  assert ev.predictions[0]["prompt"] == "<image>Output:"  # close-ended zero-shot: the query alone


def test_merge_hosts_sums_statistics():
  acc = vqa_lib.VQAAccumulator()
  acc.add("Red", ["red"])
  acc.add("blue", ["red"])
  merged = evaluators._merge_hosts(acc)
  assert merged.stats() == {"sum": 1.0, "count": 2}


def test_jsonl_data(tmp_path):
  (tmp_path / "img").mkdir()
  for i in range(3):
    (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(seed=i))
  rows = [{"image": f"img/{i}.png", "question": "what?", "answers": ["b", "a", "a"]} for i in range(3)]
  path = tmp_path / "vqa.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  data = fewshot_data.jsonl_data("vqa", str(path), str(path), 16)
  assert len(data.support) == len(data.queries) == 3
  assert data.queries[0].answers[0] == "a"  # the most frequent answer is shown in prompts
  assert data.references[0] == ("b", "a", "a")
  x = data.load(data.queries[1].image)
  chex.assert_shape(x, (1, 16, 16, 3))
  assert x.min() >= 0.0 and x.max() <= 1.0
  path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"image": "x.png"}) + "\n")
  with pytest.raises(ValueError, match=r"vqa.jsonl:2"):
    fewshot_data.jsonl_data("vqa", str(path), str(path), 16)


def test_easy_vqa_vqa_config_builds(tmp_path):
  data = fewshot_data.easy_vqa_data("vqa", str(tmp_path / "tfds"), 24, max_examples=20)
  assert len(data.support) == len(data.queries) == 20
  assert all(e.image.startswith("train/") for e in data.support)
  assert all(e.image.startswith("test/") for e in data.queries)
  q = data.queries[0]
  assert q.question.endswith("?") and data.references[0] == q.answers
  chex.assert_shape(data.load(q.image), (1, 24, 24, 3))
  small = data.subset(5)
  assert len(small.queries) == 5 and small.queries == data.subset(5).queries


def test_make_evaluator_rejects_unknown_task():
  from configs import fewshot_eval  # pylint: disable=g-import-not-at-top

  with pytest.raises(KeyError, match="easy_vqa_colour"):
    evaluators.make_evaluator("easy_vqa_colour", fewshot_eval.get_config(), 32)


def test_visual_tokens_are_cached_per_params(eval_model, model_and_params):
  _, init_params, params = model_and_params
  images = {f"c{i}": _media(50 + i) for i in range(4)}
  loads = []

  def load(ref):
    loads.append(ref)
    return images[ref]

  first = eval_model._visual(params, [["c0", "c1"], ["c1", "c2"]], load)
  assert sorted(loads) == ["c0", "c1", "c2"]  # each distinct medium encoded once
  np.testing.assert_array_equal(first[0, 1], first[1, 0])
  again = eval_model._visual(params, [["c2", "c1"]], load)
  assert len(loads) == 3  # cache hits
  np.testing.assert_array_equal(again[0, 0], first[1, 1])
  eval_model._visual(init_params, [["c0"]], load)  # other params: the cache starts over
  assert loads[-1] == "c0" and len(loads) == 4
