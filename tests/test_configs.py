"""Every config in configs/ builds, is locked against typos, and its training step traces
(`jax.eval_shape` of init and step through `train/setup.py`; nothing is allocated or compiled)."""

import jax
import numpy as np
import pytest

from configs import ablations, common, contrastive, fewshot_eval, main_job, pretrained
from configs import flamingo as flamingo_config
from flamingo_jax.parallel.mesh import MESH_AXES
from flamingo_jax.train import setup as setup_lib

TRAINING = [
  (flamingo_config, "size=tiny"),
  (main_job, ""),
  (flamingo_config, "size=3b"),
  (flamingo_config, "size=9b"),
  (flamingo_config, "size=80b"),
  (flamingo_config, "size=tiny,data=easy_vqa"),
  (main_job, "only=bursty.vqa"),
  (contrastive, "size=tiny"),
  (contrastive, "size=smollm2"),
  (contrastive, "size=f6"),
  (contrastive, "size=tiny,recipe=paper"),
  *((ablations, f"name={name}") for name in ablations.ABLATIONS),
  # The public models' presets, one per family (`dir=`: tests/reference/test_open_flamingo_use.py).
  (pretrained, "name=openflamingo-9b"),
  (pretrained, "name=idefics-80b"),
]
EVALUATION = ["", "quick=True", "runlocal=True", "tasks=easy_vqa_binding", "shots=0.4,seeds=1"]


def _id(case):
  module, arg = case
  return f"{module.__name__.split('.')[-1]}:{arg}"


@pytest.mark.parametrize("case", TRAINING, ids=_id)
def test_training_config_builds_and_its_step_traces(case):
  module, arg = case
  config = module.get_config(arg)
  with pytest.raises(AttributeError):
    config.train.totl_steps = 1  # a typo is an error, never a silent new key
  assert sorted(config.train.micro_batches) == sorted(config.data.datasets)
  # One device under every mesh axis: any rule set applies, any batch divides (shapes only here).
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
  abstract = setup_lib.setup(config, mesh)
  new_state, metrics = jax.eval_shape(abstract.step, abstract.state, abstract.batches)
  assert jax.tree.structure(new_state) == jax.tree.structure(abstract.state)
  assert metrics["loss"].shape == ()


@pytest.mark.parametrize("arg", EVALUATION)
def test_evaluation_config_builds(arg):
  config = fewshot_eval.get_config(arg)
  with pytest.raises(AttributeError):
    config.num_querys = 1


def test_micro_batches_naming_no_dataset_is_an_error():
  config = flamingo_config.get_config("size=tiny")
  with config.unlocked():
    config.train.micro_batches = {"m3ww": 2}
  with pytest.raises(KeyError, match=r"\['m3ww'\], which are not datasets"):
    common.finish(config)


def test_only_keeps_the_named_datasets_and_refuses_unknown_ones():
  config = main_job.get_config("only=bursty")
  assert sorted(config.data.datasets) == ["bursty"] and sorted(config.train.micro_batches) == ["bursty"]
  with pytest.raises(KeyError, match=r"\['burst'\] are not datasets"):
    main_job.get_config("only=burst")
