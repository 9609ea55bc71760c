"""The paper 3b training step lowered on this CPU for the accelerators it runs on (no device needed).

The real sharded, donated step of `setup` (reduced to two xattn groups and NFNet 'test'; the 3b
widths, vocabulary, bf16, fused attention and chunked loss of configs/flamingo.py) on the 8 simulated
CPU devices, lowered for 'cuda' and 'tpu' with `Traced.lower(lowering_platforms=...)`:
- for CUDA the self- and cross-attention are cuDNN's fused attention, forward and backward. On one
  device the cuDNN calls are in the lowered module; on a mesh JAX wraps them in a custom partitioning
  that the GPU compiler expands, so the CUDA check uses a one-device mesh. A CPU-only jaxlib has no
  cuDNN whose version the cuDNN path asks for, so the test answers that question as a cuDNN 9.8 on an
  sm_90 GPU would (the one private hook touched, here only);
- for both, no [B, T, V+E] fp32 value exists anywhere in the step: the loss forms the logits
  `loss_chunk` positions at a time.
"""

import re

import jax
import pytest
from jax._src.cudnn import fused_attention_stablehlo

from flamingo_jax.parallel import mesh as mesh_lib
from flamingo_jax.train import setup as setup_lib
from tests.test_plan import reduced_config

BATCH, TOKENS = 8, 256


def _lowered(platform: str, devices: int) -> tuple[str, int, int]:
  """(the step lowered for `platform` on a 'data' mesh of `devices`, V+E, loss_chunk)."""
  config = reduced_config("3b", {"data": devices}, {"m3w": (BATCH, TOKENS, 2, 1)})
  assert config.model.lm.attention == config.model.xattn.attention == "fused" and config.loss_chunk == 64
  mesh = mesh_lib.create_mesh(config.mesh.shape, devices=jax.devices()[:devices])
  abstract = setup_lib.setup(config, mesh)
  traced = abstract.step.trace(abstract.state, abstract.batches)
  vocab = config.model.lm.vocab_size + config.model.lm.num_extra_tokens
  return traced.lower(lowering_platforms=(platform,)).as_text(), vocab, config.loss_chunk


def _vocab_shapes(text: str, vocab: int) -> set[str]:
  return set(re.findall(rf"tensor<([0-9x]*)x{vocab}xf32>", text))


@pytest.fixture
def cudnn_9_8_on_sm90(monkeypatch):
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  monkeypatch.setattr(fused_attention_stablehlo, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fused_attention_stablehlo, "is_cuda_compute_capability_equal", lambda capability: False)


def test_cuda_step_uses_cudnn_fused_attention_and_no_whole_logits(cudnn_9_8_on_sm90):
  del cudnn_9_8_on_sm90
  text, vocab, chunk = _lowered("cuda", devices=1)
  calls = re.findall(r"custom_call @([\w$]+)", text)
  assert "__cudnn$fmhaScaleBiasSoftmaxBackward" in calls, sorted(set(calls))
  # Key lengths of the forward calls: the self-attention's T and the cross-attention's N*R (2 x 64).
  keys = re.findall(r"fmhaScaleBiasSoftmax\(.*?: \(tensor<\d+x\d+x\d+x\d+xbf16>, tensor<\d+x(\d+)x", text)
  assert set(keys) == {str(TOKENS), "128"}, keys
  assert _vocab_shapes(text, vocab) == {f"{BATCH}x{chunk}"}


def test_tpu_step_has_no_whole_logits():
  text, vocab, chunk = _lowered("tpu", devices=8)
  assert "__cudnn" not in text
  assert _vocab_shapes(text, vocab) == {f"{BATCH}x{chunk}"}  # global shapes: the batch is split later
