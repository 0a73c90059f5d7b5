"""Flash attention for packed documents: the Pallas (Triton) GPU kernel with segment ids.

`jax.experimental.pallas.ops.gpu.attention.mha` tiles the sequence, never builds
the [T, T] scores, and masks by `segment_ids` inside the kernel, so packed
documents never attend to each other, whatever their number per row (`cudnn`
falls back to it for a row with more than `model.max_segments_per_row`).

Under a multi-device mesh the kernel runs per shard inside `shard_map` (a
`pallas_call` is opaque to the SPMD partitioner, which would otherwise gather
q/k/v onto every device): batch over `data`, heads over `model`, exactly as the
logical rules lay out the activations. Off GPU the kernel runs in Pallas
interpret mode: correct, slow, meant for tests.
"""

from __future__ import annotations

import functools
from typing import Optional

from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from ar_lm_jax import attention as attention_lib

# Forward tiles of 128 queries x 64 keys; the fused backward needs the same number of query and key
# blocks, hence one size for all four of its tiles. `mha` shrinks each to the sequence length.
BLOCK_SIZES = pallas_attention.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                                          block_q_dq=64, block_kv_dq=64)


def kernel(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, interpret: bool):
  """The kernel on one shard's arrays."""
  return pallas_attention.mha(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, sm_scale=q_BTNH.shape[-1] ** -0.5,
                              causal=True, block_sizes=BLOCK_SIZES, interpret=interpret)


def attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, interpret: Optional[bool] = None):
  """Causal attention within each segment; q, k, v [B, T, N, H] of one dtype, segment_ids [B, T] int32."""
  if interpret is None:
    interpret = attention_lib.current_platform() not in ("gpu", "cuda")
  return attention_lib.per_shard(functools.partial(kernel, interpret=interpret))(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
