"""Model FLOPs per token, peak FLOP/s per device, and the MFU they give: what the loop reports as `mfu`."""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ar_lm_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor data sheets, without sparsity).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
}


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 x (params without the input embedding) + causal attention counted once."""
  D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
  per_layer = 4 * D * D + 3 * D * F  # q, k, v, o and the three MLP matrices (biases and norms are negligible)
  matmul_params = L * per_layer + D * V  # + LM head; the input embedding is a gather, not a matmul
  attention = 6 * L * seq_len * D  # QK^T and AV: 2 x 2 x T x D per token forward, halved by causality, x3 for backward
  return 6 * matmul_params + attention


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: Optional[float],
        num_devices: int) -> Optional[float]:
  """Model FLOPs utilization: achieved model FLOP/s over the peak of all devices (None without a peak)."""
  if not peak_per_device:
    return None
  return tokens_per_sec * flops_per_token / (peak_per_device * num_devices)


def peak_flops_per_device() -> Optional[float]:
  """Peak FLOP/s of one device: the data-sheet value on GPU/TPU, a measured fp32 matmul rate on CPU."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return measured_cpu_matmul_flops()
  return peak_flops_for_kind(dev.device_kind)


def peak_flops_for_kind(device_kind: str) -> Optional[float]:
  """Data-sheet peak of a device by its jax device_kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...); None if unknown.

  The longest matching name wins, so "TPU v5 lite" (v5e) is not taken for "TPU v5" (v5p).
  """
  kind = device_kind.lower()
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops
  return None


@functools.lru_cache(maxsize=None)
def measured_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """The best rate of an n x n x n fp32 matmul on this CPU (all cores), in FLOP/s."""
  return matmul_probe(n)(repeats)


def matmul_probe(n: int) -> Callable[[int], float]:
  """A compiled n^3 fp32 matmul; calling it with `repeats` returns its best rate in FLOP/s.

  The benchmark calls it between timed steps, so that the CPU peak is measured under the same load as the steps.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()

  def rate(repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best

  return rate
