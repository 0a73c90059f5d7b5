"""Causal attention restricted to one packed document (segment): the reference, the kernels, and the choice.

Every implementation takes `segment_ids_BT` so that attention never crosses a
document boundary; `xla` is the reference the others are tested against.

| name     | platform | how documents are kept apart                                          |
| -------- | -------- | --------------------------------------------------------------------- |
| `xla`    | any      | an explicit [B, T, S] segment-and-causal mask (materializes scores)   |
| `cudnn`  | GPU      | cuDNN flash attention, per-document lengths and offsets (packed/THD)  |
| `pallas` | GPU      | the Pallas Triton flash kernel, segment ids inside the kernel         |
| `splash` | TPU      | the Pallas TPU splash kernel, `SegmentIds` and a causal mask          |
| `auto`   |          | `resolve_attention`: cudnn (pallas for fp32) / splash / xla on CPU    |

The kernels run per shard under `shard_map` (`per_shard`): a custom call or a
`pallas_call` is opaque to the SPMD partitioner, which would otherwise gather
q/k/v onto every device. Off their platform `pallas` and `splash` run in Pallas
interpret mode (correct, slow: for tests) and `cudnn` computes the reference.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_lm_jax.config import ATTENTION_IMPLS, ATTENTION_KERNELS, ModelConfig

# The platform each kernel compiles for natively (xla, absent here, runs everywhere).
KERNEL_PLATFORM = {impl: platform for impl, platform in ATTENTION_KERNELS.items() if platform is not None}


def segment_causal_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T, S] bool: query t may see key s iff s <= t and both are in the same segment."""
  T = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same_BTS & causal_TS[None]


def xla_attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT):
  """Plain einsum attention; scores and softmax in fp32."""
  scale = q_BTNH.shape[-1] ** -0.5
  scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH, preferred_element_type=jnp.float32) * scale
  mask_BTS = segment_causal_mask(segment_ids_BT)
  scores_BNTS = jnp.where(mask_BTS[:, None], scores_BNTS, jnp.finfo(jnp.float32).min)
  probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(v_BTNH.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BTNH)


def resolve_attention(cfg: ModelConfig, platform: str) -> str:
  """The kernel `cfg.attention` names on `platform` ("gpu"/"cuda", "tpu", "cpu"): never `auto`.

  `auto` is cuDNN on GPU for bf16 compute (cuDNN's flash kernel takes only
  bf16/fp16; fp32 compute gets the Pallas kernel), splash on TPU, and the
  reference elsewhere. The one place the choice is made: the model and the
  dry run both call it.
  """
  if cfg.attention != "auto":
    return cfg.attention
  if platform in ("gpu", "cuda"):
    return "cudnn" if cfg.dtype == "bfloat16" else "pallas"
  if platform == "tpu":
    return "splash"
  return "xla"


def current_platform() -> str:
  """The platform of the mesh being traced for (a TPU topology compiled on a CPU host says tpu), else the backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def per_shard(kernel: Callable) -> Callable:
  """`kernel(q, k, v, segment_ids)` run on each device's shard: batch over `data`, heads over `model`.

  The specs come from the same logical rules that lay out the activations, so
  entering and leaving the shard_map moves no data.
  """
  def run(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT):
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return kernel(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
    qkv_spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "head_dim"))
    seg_spec = nn.logical_to_mesh_axes(("batch", "length"))
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
                         check_vma=False)(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
  return run


# ---- cuDNN: packed documents as per-document lengths and offsets ----

def document_seqlens_offsets(segment_ids_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each row's documents as cuDNN's packed layout takes them: (seqlens [B, M], offsets [B, M+1], count [B]).

  A document is a maximal run of equal segment ids (padding, id 0, is a run
  too, so every token belongs to one and the output equals the reference at
  padding positions as well). seqlens[b, i] is the i-th run's length and
  offsets[b, i] its first token; the rest are -1, as
  `fused_attention_stablehlo.dot_product_attention` expects (offsets carry no
  end entry: jax appends it when it flattens the batch). count[b] is the number
  of runs; where it exceeds M, the first M - 1 runs are listed and the last
  slot covers the rest of the row, which is only correct attention when count
  <= M (the caller checks). Equals the reference's mask whenever each segment
  id is one contiguous run per row, as packing emits them.
  """
  B, T = segment_ids_BT.shape
  M = max_segments
  starts_BT = jnp.concatenate([jnp.ones((B, 1), jnp.bool_), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  count_B = jnp.sum(starts_BT, axis=1, dtype=jnp.int32)
  run_BT = jnp.minimum(jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32) - 1, M - 1)  # run index, overflow into slot M-1
  seqlens_BM = jax.vmap(lambda r: jnp.bincount(r, length=M))(run_BT).astype(jnp.int32)
  t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  first_BM = jax.vmap(lambda r, t: jnp.full((M,), T, jnp.int32).at[r].min(t))(run_BT, t_BT)
  used_BM = seqlens_BM > 0
  seqlens_BM = jnp.where(used_BM, seqlens_BM, -1)
  offsets_BM1 = jnp.concatenate([jnp.where(used_BM, first_BM, -1), jnp.full((B, 1), -1, jnp.int32)], axis=1)
  return seqlens_BM, offsets_BM1, count_B


def _cudnn_kernel(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, *, max_segments: int):
  """cuDNN flash attention with a causal mask inside each document; rows with more than M documents use pallas."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # jax's only entry with per-document offsets
  from ar_lm_jax import flash_attention

  seqlens_BM, offsets_BM1, count_B = document_seqlens_offsets(segment_ids_BT, max_segments)

  def cudnn(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT):
    return cudnn_fa.dot_product_attention(
        q_BTNH, k_BTNH, v_BTNH, q_seqlen=seqlens_BM, kv_seqlen=seqlens_BM, q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1, scale=q_BTNH.shape[-1] ** -0.5, mask_type=cudnn_fa.MaskType.CAUSAL, qkv_layout="BTNH")

  def pallas(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT):
    return flash_attention.kernel(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, interpret=False)

  # A static M keeps cuDNN's shapes fixed; the rare shard with a row of more documents takes the Pallas
  # kernel (exact for any number of documents) instead of merging documents. Per shard: no collective.
  return jax.lax.cond(jnp.max(count_B) <= max_segments, cudnn, pallas, q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)


def cudnn_attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, max_segments: int = 64):
  """cuDNN's packed-document flash attention on GPU (q, k, v bf16/fp16); the reference elsewhere."""
  if current_platform() not in ("gpu", "cuda"):
    return xla_attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
  kernel = lambda q, k, v, s: _cudnn_kernel(q, k, v, s, max_segments=max_segments)
  return per_shard(kernel)(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)


def attend(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, cfg: ModelConfig):
  """Causal attention within each segment with the kernel `cfg.attention` resolves to on the traced platform."""
  impl = resolve_attention(cfg, current_platform())
  assert impl in ATTENTION_IMPLS and impl != "auto", impl
  if impl == "xla":
    return xla_attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
  if impl == "cudnn":
    return cudnn_attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, cfg.max_segments_per_row)
  # Pallas kernels are imported lazily, so a CPU run with the reference never loads Triton or Mosaic.
  if impl == "pallas":
    from ar_lm_jax import flash_attention
    return flash_attention.attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
  from ar_lm_jax import splash_attention
  return splash_attention.attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, splash_attention.block_sizes(cfg))
