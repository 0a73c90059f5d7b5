"""Causal attention restricted to one packed document (segment), several implementations.

Every implementation takes `segment_ids_BT` so that attention never crosses a
document boundary; `xla` is the reference the others are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def cudnn_attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT):
  """`jax.nn.dot_product_attention` (cuDNN on GPU, bf16/fp16 only; XLA elsewhere).

  cuDNN's fused kernel takes no segment ids, so the same-document mask goes in
  as an explicit [B, 1, T, S] mask (jax turns it into an additive bias), while
  `is_causal` lets cuDNN skip the blocks above the diagonal.
  """
  same_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  impl = "cudnn" if jax.default_backend() == "gpu" else None
  return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, mask=same_B1TS, is_causal=True, implementation=impl)


_IMPLS = {"xla": xla_attention, "cudnn": cudnn_attention}


def attend(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, impl: str = "xla"):
  if impl == "pallas":
    from ar_lm_jax import flash_attention  # a GPU kernel; imported lazily so CPU runs never load Pallas/Triton
    return flash_attention.attention(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
  return _IMPLS[impl](q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
