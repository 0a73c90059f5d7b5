"""What flash attention removes: the temporaries of one layer's reference attention, forward + backward.

  python -m benchmarks.attention_memory [--batch=6] [--seq_len=4096] [--heads=32] [--head_dim=64]

Compiles (never runs) the gradient of the `xla` reference attention for one
device's share of the recipe (6 sequences of 4096, 32 heads of 64, bf16) with
the local XLA compiler and prints its temporaries. With remat the train step
holds one layer's attention backward at a time, so this is most of the dry
run's temporaries. The flash kernels (`cudnn`, `pallas`, `splash`) keep no
[B, N, T, S] tensor at all; cuDNN's packed layout adds softmax statistics of
[B x max_segments_per_row, N, T] fp32, printed for comparison. Their own
temporaries can only be measured where they compile (a GPU; a TPU or the TPU dry run).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from ar_lm_jax import attention, startup


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=6)
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--max_segments", type=int, default=64)
  a = p.parse_args()
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  B, T, N, H = a.batch, a.seq_len, a.heads, a.head_dim
  qkv = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def grads(q, k, v, s):
    return jax.grad(lambda q, k, v: jnp.sum(attention.xla_attention(q, k, v, s).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

  stats = jax.jit(grads).lower(qkv, qkv, qkv, seg).compile().memory_analysis()
  scores = B * N * T * T * 4
  print(f"xla reference attention, forward + backward, [{B}, {T}, {N}, {H}] bf16 on {jax.default_backend()}: "
        f"temporaries {stats.temp_size_in_bytes / 1e9:.2f} GB ({scores / 1e9:.2f} GB per fp32 [B, N, T, T] tensor)")
  print(f"cudnn softmax statistics [{B} x {a.max_segments}, {N}, {T}] fp32: {B * a.max_segments * N * T * 4 / 1e9:.2f} GB")


if __name__ == "__main__":
  main()
