"""Next-token cross-entropy over packed rows, optionally chunked over the sequence.

Targets are the row's tokens shifted left; a position is scored only when its
next token belongs to the same (non-padding) document, so packed documents never
predict each other. Chunking computes the LM head and the fp32 softmax a slice of
positions at a time under `jax.checkpoint`, so the fp32 logits of a full
micro-batch ([B, T, 100352]) never exist at once, in the forward or the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ar_lm_jax.model import lm_logits


def targets_and_mask(tokens_BT: jax.Array, segment_ids_BT: jax.Array):
  """targets[t] = tokens[t+1]; mask[t] = same non-padding segment at t and t+1 (last position never scored)."""
  targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
  next_seg_BT = jnp.concatenate([segment_ids_BT[:, 1:], jnp.zeros_like(segment_ids_BT[:, :1])], axis=1)
  mask_BT = (segment_ids_BT != 0) & (next_seg_BT == segment_ids_BT)
  return targets_BT, mask_BT


def _token_nll(logits_BTV: jax.Array, targets_BT: jax.Array):
  """Per-position NLL and log-partition, fp32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return lse_BT - target_logit_BT, lse_BT


def nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int = 0):
  """(sum of NLL, sum of log(Z)^2) over masked positions."""
  B, T, D = hidden_BTD.shape
  if chunk_size <= 0 or chunk_size >= T:
    nll_BT, lse_BT = _token_nll(lm_logits(hidden_BTD, head_DV, dtype), targets_BT)
    return jnp.sum(nll_BT * mask_BT), jnp.sum(jnp.square(lse_BT) * mask_BT)
  if T % chunk_size:
    raise ValueError(f"train.loss_chunk_size={chunk_size} must divide data.seq_len={T}")
  n = T // chunk_size
  # [B, T, ...] -> [n, B, C, ...]: chunks along the sequence keep the batch axis (and its data sharding) intact.
  def split(x):
    return jnp.moveaxis(x.reshape(B, n, chunk_size, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_sums(h_BCD, t_BC, m_BC):
    nll_BC, lse_BC = _token_nll(lm_logits(h_BCD, head_DV, dtype), t_BC)
    return jnp.sum(nll_BC * m_BC), jnp.sum(jnp.square(lse_BC) * m_BC)

  def body(carry, xs):
    s_nll, s_z = chunk_sums(*xs)
    return (carry[0] + s_nll, carry[1] + s_z), None

  zero = jnp.zeros((), jnp.float32)
  (s_nll, s_z), _ = jax.lax.scan(body, (zero, zero), (split(hidden_BTD), split(targets_BT), split(mask_BT.astype(jnp.float32))))
  return s_nll, s_z
