"""Model FLOPs per token and peak device FLOP/s, for MFU."""

from __future__ import annotations

import functools
import time
from typing import Optional

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


def peak_flops_per_device() -> Optional[float]:
  """Peak FLOP/s of one device: the data-sheet value on GPU/TPU, a measured fp32 matmul rate on CPU."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return measured_cpu_matmul_flops()
  kind = dev.device_kind.lower()
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops
  return None


@functools.lru_cache(maxsize=None)
def measured_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """The best rate of an n x n x n fp32 matmul on this CPU (all cores), in FLOP/s."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best
