"""The FLOP count behind MFU: every matmul parameter and causal attention, the 1.6B reference; the peaks per device kind."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from ar_lm_jax import flops, tpu_topology
from ar_lm_jax.config import load_config
from ar_lm_jax.model import abstract_params, param_count


def test_flops_per_token_counts_every_matmul_parameter_and_causal_attention():
  cfg = load_config("ar_stablelm_2_1_6b").model
  params = nn.meta.unbox(abstract_params(cfg))
  matrices = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if jax.tree_util.keystr(path).endswith("['kernel']"))  # q/k/v/o, MLP, LM head; not the embedding
  seq = 4096
  want = 6 * matrices + 6 * cfg.num_layers * seq * cfg.hidden_size  # QK^T and AV: 4 T D fwd, halved, x3
  assert flops.model_flops_per_token(cfg, seq) == want
  assert param_count(params) == 1_644_515_328
  assert abs(want / 9.8e9 - 1) < 0.01  # REFERENCE.md: about 9.8 GFLOP per token


def test_tpu_peaks_for_mfu_come_from_the_chip_table():
  for chip in tpu_topology.CHIPS.values():
    assert flops.peak_flops_for_kind(chip.device_kind) == chip.peak_bf16_flops, chip


def test_mfu_is_model_flops_over_the_peak_of_every_device():
  assert flops.mfu(1000.0, 6e9, 1e12, 4) == pytest.approx(1000 * 6e9 / 4e12)
  assert flops.mfu(1000.0, 6e9, None, 4) is None  # an unknown device kind: no MFU rather than a wrong one


def test_cpu_peak_is_a_measured_matmul_rate():
  if jax.devices()[0].platform != "cpu":
    pytest.skip("the data-sheet peaks of accelerators are checked above")
  assert flops.peak_flops_per_device() == flops.measured_cpu_matmul_flops() > 1e8  # this host is a CPU
