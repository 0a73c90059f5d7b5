"""Next-token cross-entropy over packed rows, optionally chunked over the sequence.

Targets are the row's tokens shifted left; a position is scored only when its
next token belongs to the same (non-padding) document, so packed documents never
predict each other.

Chunking computes the LM head and the fp32 softmax a slice of positions at a
time, so the fp32 logits of a full micro-batch ([B, T, 100352]) never exist at
once, in the forward or the backward. Two chunked paths:

- fused (when log(Z)^2 needs no gradient, i.e. no z-loss): the loss is the end
  of the graph, so d(loss)/d(logits) = softmax - onehot is known in the forward.
  Each chunk computes its logits once and turns them straight into its share of
  the hidden-state and LM-head gradients (a custom VJP that only scales them by
  the incoming cotangent). Three LM-head matmuls per chunk, as unchunked
  autodiff does, with no logits saved for the backward.
- recompute (z-loss on): each chunk under `jax.checkpoint`, so the backward
  recomputes the chunk's logits: four matmuls, any cotangents.
"""

from __future__ import annotations

import functools

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


def nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int = 0, z_grad: bool = True):
  """(sum of NLL, sum of log(Z)^2) over masked positions.

  `chunk_size` positions per chunk along the sequence (0: unchunked autodiff). With
  `z_grad=False` the log(Z)^2 sum carries no gradient, which lets a chunked loss
  take the fused path.
  """
  B, T, D = hidden_BTD.shape
  if chunk_size <= 0:
    nll_BT, lse_BT = _token_nll(lm_logits(hidden_BTD, head_DV, dtype), targets_BT)
    s_z = jnp.sum(jnp.square(lse_BT) * mask_BT)
    return jnp.sum(nll_BT * mask_BT), (s_z if z_grad else jax.lax.stop_gradient(s_z))
  chunk_size = min(chunk_size, T)  # one chunk: the whole sequence at once, still with the fused gradient
  if T % chunk_size:
    raise ValueError(f"train.loss_chunk_size={chunk_size} must divide data.seq_len={T}")
  mask_BT = mask_BT.astype(jnp.float32)
  if not z_grad:
    s_nll, s_z = _fused_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size)
    return s_nll, jax.lax.stop_gradient(s_z)
  return _recompute_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size)


def _split(x, chunk_size: int):
  """[B, T, ...] -> [n, B, C, ...]: chunks along the sequence keep the batch axis (and its data sharding) intact."""
  B, T = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, T // chunk_size, chunk_size, *x.shape[2:]), 1, 0)


def _unsplit(x):
  n, B, C = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, n * C, *x.shape[3:])


def _recompute_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int):

  @jax.checkpoint
  def chunk_sums(h_BCD, t_BC, m_BC):
    nll_BC, lse_BC = _token_nll(lm_logits(h_BCD, head_DV, dtype), t_BC)
    return jnp.sum(nll_BC * m_BC), jnp.sum(jnp.square(lse_BC) * m_BC)

  def body(carry, xs):
    s_nll, s_z = chunk_sums(*xs)
    return (carry[0] + s_nll, carry[1] + s_z), None

  zero = jnp.zeros((), jnp.float32)
  xs = (_split(hidden_BTD, chunk_size), _split(targets_BT, chunk_size), _split(mask_BT, chunk_size))
  (s_nll, s_z), _ = jax.lax.scan(body, (zero, zero), xs)
  return s_nll, s_z


def _fused_forward(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int, with_grads: bool):
  """The sums and, `with_grads`, d(s_nll)/d(hidden) and d(s_nll)/d(head), one chunk of logits at a time."""
  dt = jnp.dtype(dtype)
  head_dt_DV = head_DV.astype(dt)

  def body(carry, xs):
    s_nll, s_z, dhead_DV = carry
    h_BCD, t_BC, m_BC = xs
    logits_BCV = lm_logits(h_BCD, head_DV, dtype)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_logit_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    s_nll = s_nll + jnp.sum((lse_BC - target_logit_BC) * m_BC)
    s_z = s_z + jnp.sum(jnp.square(lse_BC) * m_BC)
    if not with_grads:
      return (s_nll, s_z, dhead_DV), None
    probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    onehot_BCV = jnp.arange(logits_BCV.shape[-1], dtype=t_BC.dtype) == t_BC[..., None]
    dlogits_BCV = ((probs_BCV - onehot_BCV) * m_BC[..., None]).astype(dt)
    dh_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, head_dt_DV, preferred_element_type=jnp.float32)
    dhead_DV = dhead_DV + jnp.einsum("bcd,bcv->dv", h_BCD.astype(dt), dlogits_BCV, preferred_element_type=jnp.float32)
    return (s_nll, s_z, dhead_DV), dh_BCD.astype(hidden_BTD.dtype)

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros(head_DV.shape if with_grads else (), jnp.float32))
  xs = (_split(hidden_BTD, chunk_size), _split(targets_BT, chunk_size), _split(mask_BT, chunk_size))
  (s_nll, s_z, dhead_DV), dh_nBCD = jax.lax.scan(body, init, xs)
  if not with_grads:
    return s_nll, s_z, None, None
  return s_nll, s_z, _unsplit(dh_nBCD), dhead_DV.astype(head_DV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int):
  s_nll, s_z, _, _ = _fused_forward(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size, with_grads=False)
  return s_nll, s_z


def _fused_fwd(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size):
  s_nll, s_z, dh_BTD, dhead_DV = _fused_forward(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size, with_grads=True)
  return (s_nll, s_z), (dh_BTD, dhead_DV)


def _fused_bwd(dtype, chunk_size, residuals, cotangents):
  # The caller stops the gradient of s_z, so only s_nll's cotangent is ever non-zero.
  dh_BTD, dhead_DV = residuals
  g_nll, _ = cotangents
  return ((g_nll * dh_BTD).astype(dh_BTD.dtype), (g_nll * dhead_DV).astype(dhead_DV.dtype), None, None)


_fused_nll_sums.defvjp(_fused_fwd, _fused_bwd)
