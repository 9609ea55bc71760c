"""Parameter counts of the paper sizes (from shapes only) against the paper's Table 4 / App. B.1.1."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import flamingo as flamingo_config
from flamingo_jax import summary
from flamingo_jax.models import flamingo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ("3b", "9b", "80b")
PAPER_TOTAL = {"3b": 3.2e9, "9b": 9.3e9, "80b": 80e9}
PAPER_LM = {"3b": 1.4e9, "9b": 7.1e9, "80b": 70e9}
PAPER_RESAMPLER = 194e6
PAPER_VISION = 435e6  # NFNet-F6


def _close(value, target, rel):
  return abs(value / target - 1.0) <= rel


@pytest.fixture(scope="module", autouse=True)
def cli():
  """The entry point as a user runs it, started first so that it overlaps the in-process counts.

  Its JSON is `count_by_component(flamingo.param_shapes(config.model), config.trainable)` for size=3b, i.e. the 3b
  row below: tracing NFNet-F6 for the shapes costs ~6 s per size here, so 3b is not traced twice.
  `data=synthetic` only spares the import of TensorFlow that the paper data section needs (~10 s here);
  the model section and the trainable rules are those of plain `size=3b`.
  """
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "flamingo_jax.summary",
      "--config",
      "configs/flamingo.py:size=3b,data=synthetic",
      "--json",
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def counts(cli):
  counts = {
    size: summary.count_by_component(
      flamingo.param_shapes(flamingo.model_config(size)), flamingo_config.TRAINABLE
    )
    for size in ("9b", "80b")
  }
  stdout, stderr = cli.communicate(timeout=300)
  assert cli.returncode == 0, stderr[-3000:]
  report = json.loads(stdout)
  assert report.pop("size") == "3b"
  counts["3b"] = report
  return counts


@pytest.mark.parametrize("size", SIZES)
def test_totals_match_the_paper(counts, size):
  c = counts[size]
  assert _close(c["total"], PAPER_TOTAL[size], 0.05), (size, c["total"])
  assert _close(c["lm"], PAPER_LM[size], 0.05), (size, c["lm"])


@pytest.mark.parametrize("size", SIZES)
def test_resampler_and_vision_encoder_match_the_paper(counts, size):
  c = counts[size]
  assert _close(c["resampler"], PAPER_RESAMPLER, 0.05), c["resampler"]
  assert _close(c["vision"], PAPER_VISION, 0.02), c["vision"]


@pytest.mark.parametrize("size", SIZES)
def test_trainable_and_frozen_partition_the_total(counts, size):
  c = counts[size]
  assert c["trainable"] + c["frozen"] == c["total"]
  components = ("vision", "resampler", "xattn", "lm_extra_tokens", "lm")
  assert sum(c[k] for k in components) == c["total"]
  # Paper §2.4: the resampler, the xattn blocks and the new token rows train; the rest is frozen.
  assert c["trainable"] == c["resampler"] + c["xattn"] + c["lm_extra_tokens"]
  assert c["frozen"] == c["vision"] + c["lm"]
  assert c["lm_extra_tokens"] == 2 * 2 * flamingo.SIZES[size]["lm"]["dim"]  # <image>, <EOC>; untied


def test_3b_xattn_blocks_match_the_paper(counts):
  assert _close(counts["3b"]["xattn"], 1.2e9, 0.05), counts["3b"]["xattn"]


def test_count_by_component_rejects_unclaimed_parameters():
  stray = {"stray": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
  with pytest.raises(ValueError, match="stray/w"):
    summary.count_by_component(stray, [])


def test_cli_json_agrees_with_in_process_counts(counts):
  cli_3b = counts["3b"]
  assert set(cli_3b) == set(counts["9b"])
  assert all(isinstance(v, int) for v in cli_3b.values())
  # The vision encoder (NFNet-F6) and the resampler are the same in every paper size.
  for key in ("vision", "resampler"):
    assert cli_3b[key] == counts["9b"][key] == counts["80b"][key], key


# The public models' own figures: IDEFICS's model cards (9B, 80B parameters); OpenFlamingo-3B's
# released checkpoint.pt holds its trained parts (resampler, blocks, the LM's input embedding with
# its three new rows) in fp32: 4.19 GB.
PUBLIC_TOTALS = {"idefics-9b": 9e9, "idefics-80b": 80e9}


@pytest.mark.parametrize("name", sorted(PUBLIC_TOTALS))
def test_idefics_totals_within_one_percent_of_the_model_cards(name):
  c = summary.count_by_component(flamingo.param_shapes(flamingo.model_config(name)), [])
  assert abs(c["total"] / PUBLIC_TOTALS[name] - 1) < 0.01, c["total"]


def test_openflamingo_3b_trained_parts_match_its_checkpoint_file():
  cfg = flamingo.model_config("openflamingo-3b")
  c = summary.count_by_component(flamingo.param_shapes(cfg), [])
  embedding = (cfg.lm.vocab_size + 3) * cfg.lm.dim  # OpenFlamingo trains the whole input table
  trained = c["resampler"] + c["xattn"] + embedding
  assert abs(trained * 4 / 4.19e9 - 1) < 0.01, trained
