"""The in-context binding evaluator (flamingo_jax/eval/binding.py) on the tiny model.

Byte-level tokenizer, random images: the numbers are meaningless, the bookkeeping is checked
(cells, controls, keys, host sums) and `generate_and_score` against the separate generation and
scoring paths.
"""

import itertools

import jax
import numpy as np
import pytest

from flamingo_jax.data import binding as binding_lib
from flamingo_jax.eval import binding, engine, evaluators, fewshot_data
from tests.models import helpers

S = 32
NAMES = ("dax", "wug", "fep", "zup", "kiki", "toma")


@pytest.fixture(scope="module")
def model_and_params(tok):
  model, params = helpers.tiny_eval_model(tok.vocab_size, S)
  return model, helpers.open_gates(params, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def images():
  triples = [
    (f"test/{c}{s}{i}", c, s)
    for c, s in itertools.product(("red", "blue"), ("circle", "triangle"))
    for i in range(4)
  ]
  pixels = {
    ref: np.random.default_rng(n).uniform(size=(1, S, S, 3)).astype(np.float32)
    for n, (ref, _, _) in enumerate(triples)
  }
  blank = np.zeros((1, S, S, 3), np.float32)
  return triples, lambda ref: blank if ref == fewshot_data.BLANK else pixels[ref]


def _evaluator(images, **kw):
  triples, load = images
  options = dict(
    class_mode="shape_color",
    ways=(2,),
    shots=(1, 2),
    episodes=5,
    controls=("text_only", "shuffled", "real_names"),
    ranked=True,
    max_new_tokens=3,
  )
  options.update(kw)
  return binding.BindingEvaluator(triples, load, NAMES, **options)


def test_generate_and_score_matches_generate_and_rank(model_and_params, tok, images):
  model, params = model_and_params
  em = engine.EvalModel(model, tok, batch_size=2, num_beams=1, image_batch_size=4)
  ev = _evaluator(images)
  episodes = [binding_lib.make_episode(ev.pool, NAMES, n_way=2, k_shot=1, seed=0, index=i) for i in range(3)]
  ids, media, length = ev._prompts(episodes, "none", tok)
  conts = [[tok.encode(f" {n}") for n in e.names] for e in episodes]
  texts, scores = em.generate_and_score(
    params, ids, media, conts, ev.load, prompt_len=length, max_new_tokens=3
  )
  assert texts == em.generate(params, ids, media, ev.load, prompt_len=length, max_new_tokens=3)
  # The same candidates for every prompt: the separate scoring path (one row per candidate).
  same = [conts[0]] * len(ids)
  _, scores_same = em.generate_and_score(
    params, ids, media, same, ev.load, prompt_len=length, max_new_tokens=3
  )
  ranked = em.rank(params, [[i] for i in ids], [[m] for m in media], conts[0], ev.load, prompt_len=length)
  np.testing.assert_allclose(scores_same, ranked.scores, rtol=1e-4, atol=1e-4)
  assert scores.shape == (3, 2) and np.all(np.isfinite(scores))


def test_sweep_reports_every_cell_and_control(model_and_params, tok, images):
  model, params = model_and_params
  em = engine.EvalModel(model, tok, batch_size=4, num_beams=1, image_batch_size=8)
  ev = _evaluator(images, shots=(1,))
  seen = []
  results, metrics = ev.sweep(
    em, params, tok, seeds=(0, 1), on_cell=lambda name, r: seen.append((name, len(r["predictions"])))
  )
  assert len(seen) == 2 * 4 and all(n == 5 for _, n in seen)
  assert set(results["cells"]) == {"none", "text_only", "shuffled", "real_names"}
  assert results["chance"] == {"2way": 50.0}
  for k in (1,):
    for metric in binding.METRICS:
      assert binding.metric_key(2, k, "none", metric) in metrics
      assert f"eval/easy_vqa_binding/2way/{k}shot/shuffled/{metric}" in metrics
    cell = results["cells"]["none"]["2way"][f"{k}shot"]["accuracy"]
    assert set(cell["seeds"]) == {"0", "1"} and 0 <= cell["mean"] <= 100
  assert "eval/easy_vqa_binding/2way/1shot/accuracy" in metrics
  table = binding.format_table(results)
  assert "2way 1shot" in table and "shuffled" in table


def test_text_only_control_has_no_images(tok, images):
  ev = _evaluator(images)
  episodes = [binding_lib.make_episode(ev.pool, NAMES, n_way=2, k_shot=2, seed=0, index=0)]
  ids, media, _ = ev._prompts(episodes, "text_only", tok)
  assert media == [()] and tok.image_id not in ids[0] and tok.eoc_id not in ids[0]
  ids, media, _ = ev._prompts(episodes, "none", tok)
  assert len(media[0]) == 8 and media[0][5:] == (fewshot_data.BLANK,) * 3  # 5 media -> bucket 8
  assert ids[0].count(tok.image_id) == 5


def test_statistics_are_summed_over_hosts(monkeypatch, model_and_params, tok, images):
  """Two simulated hosts: each runs its own episodes; the counts are the sums of both."""
  model, params = model_and_params
  em = engine.EvalModel(model, tok, batch_size=4, num_beams=1, image_batch_size=8)
  ev = _evaluator(images, controls=(), episodes=7)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  other = np.asarray([3.0, 2.0, 1.0, 4.0])  # correct, ranked_correct, follows, count
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, other]))
  stats = ev.cell(em, params, tok, n_way=2, k_shot=1, seed=0, control="none")
  mine = ev.predictions
  assert [p["episode"] for p in mine] == [0, 2, 4, 6]  # host 0 of 2
  assert stats["count"] == 4 + 4
  assert stats["correct"] == sum(p["correct"] for p in mine) + 3
  assert evaluators.sum_over_hosts(np.asarray([1.0, 1.0, 1.0, 1.0])).tolist() == [4, 3, 2, 5]


def test_from_config_refuses_overlapping_names(tmp_path):
  from configs import fewshot_eval  # pylint: disable=g-import-not-at-top

  config = fewshot_eval.get_config("runlocal=True")
  names = binding_lib.read_word_list(binding_lib.default_word_list("eval"))
  with pytest.raises(ValueError, match=f"share 2 words: \\['{names[0]}', '{names[1]}'\\]"):
    binding.BindingEvaluator.from_config(config, S, ("dax", names[1], names[0]))
