"""Flash attention for packed documents on TPU: the Pallas (Mosaic) splash kernel with segment ids.

`jax.experimental.pallas.ops.tpu.splash_attention` tiles q and k/v, skips the
tiles above the causal diagonal from a static block mask, and masks by
`SegmentIds` inside the tiles it computes, so packed documents never attend to
each other and the [T, T] scores never exist. Its backward is two Pallas
kernels (dq, and dk/dv) with their own tile sizes.

Layout: the kernel takes one example, q [N, T, H] and k/v [N, S, H] (heads
first), so it is vmapped over the batch and q/k/v are transposed from the
model's [B, T, N, H]. It applies no softmax scale: q is scaled by H^-0.5 here,
before the kernel. Under a mesh it runs per shard (`attention.per_shard`):
each device sees B/data rows and N/model heads, and builds the kernel for its
own head count. Mosaic lowers only for TPU; elsewhere the kernel runs in
Pallas interpret mode (correct, slow: the CPU tests run it this way).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from ar_lm_jax import attention as attention_lib
from ar_lm_jax.config import ModelConfig


def block_sizes(cfg: ModelConfig) -> tuple[int, int, int, int]:
  """(block_q, block_kv, block_q_dkv, block_kv_dkv) from the config; each is shrunk to T when building the kernel."""
  return (cfg.splash_block_q, cfg.splash_block_kv, cfg.splash_block_q_dkv, cfg.splash_block_kv_dkv)


def _make_kernel(num_heads: int, T: int, blocks: tuple[int, int, int, int], interpret: bool):
  """The causal splash kernel for one example of `num_heads` heads.

  Built at each trace, never cached: its block-mask arrays are made while
  tracing, and a cached kernel would carry one trace's values into another.
  """
  bq, bkv, bq_dkv, bkv_dkv = (min(b, T) for b in blocks)
  if any(T % b or b % 128 for b in (bq, bkv, bq_dkv, bkv_dkv)):  # config.py checks this up front for an explicit splash
    raise ValueError(f"splash attention: blocks {blocks} shrunk to T={T} must divide T and be multiples of 128 "
                     "(model.splash_block_*, data.seq_len)")
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                            block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv, block_kv_dkv_compute=bkv_dkv,
                            block_q_dq=bq, block_kv_dq=bkv)
  mask = splash.MultiHeadMask([splash.CausalMask((T, T)) for _ in range(num_heads)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _kernel(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, *, blocks, interpret: bool):
  _, T, N, H = q_BTNH.shape
  kernel = _make_kernel(N, T, blocks, interpret)
  to_NTH = lambda x_BTNH: jnp.swapaxes(x_BTNH, 1, 2)
  # Scaled before the kernel, in q's dtype: exact in bf16 when H is a power of 4 (H = 64: x 0.125).
  q_BNTH = to_NTH(q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype))
  out_BNTH = jax.vmap(kernel)(q_BNTH, to_NTH(k_BTNH), to_NTH(v_BTNH),
                              splash.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT))
  return to_NTH(out_BNTH)


def attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, blocks=(512, 512, 512, 512), interpret=None):
  """Causal attention within each segment; q, k, v [B, T, N, H] of one dtype, segment_ids [B, T] int32."""
  if interpret is None:
    interpret = attention_lib.current_platform() != "tpu"
  kernel = functools.partial(_kernel, blocks=tuple(blocks), interpret=interpret)
  return attention_lib.per_shard(kernel)(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
