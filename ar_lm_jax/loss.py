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

One gradient reduction per step. The LM-head gradient is a sum over the batch,
which is sharded over `data`; accumulated in one [D, V] buffer across chunks,
XLA would all-reduce it (and the loss sums) once per chunk. Both chunked paths
therefore keep `grad_groups` partial sums, one per data shard ([G, D, V] with G
on `data`: each device holds only its own [D, V], as before), and add them up
once after the loop, where the step's ZeRO-1 layout turns the sum into one
reduce-scatter. The loops run under the named scope `chunked_loss`, so a
collective report can check that nothing inside them communicates.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_lm_jax.model import lm_logits

LOOP_SCOPE = "chunked_loss"  # named scope of the loops over chunks (their HLO while loops carry it)
# Per-data-shard partial sums: G on the batch's mesh axis, the vocab as the logits are laid out.
_PARTIAL_GDV = ("batch", None, "act_vocab")
_LOGITS_GbCV = ("batch", None, "length", "act_vocab")


def targets_and_mask(tokens_BT: jax.Array, segment_ids_BT: jax.Array, loss_mask_BT=None):
  """targets[t] = tokens[t+1]; mask[t] = same non-padding segment at t and t+1 (last position never scored).

  `loss_mask_BT[t]` (optional, default all ones) says whether token t is a scored target, e.g. an
  assistant token of a conversation: position t is then scored only if token t+1 is.
  """
  targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
  next_seg_BT = jnp.concatenate([segment_ids_BT[:, 1:], jnp.zeros_like(segment_ids_BT[:, :1])], axis=1)
  mask_BT = (segment_ids_BT != 0) & (next_seg_BT == segment_ids_BT)
  if loss_mask_BT is not None:
    next_scored_BT = jnp.concatenate([loss_mask_BT[:, 1:], jnp.zeros_like(loss_mask_BT[:, :1])], axis=1)
    mask_BT = mask_BT & (next_scored_BT != 0)
  return targets_BT, mask_BT


def _token_nll(logits_BTV: jax.Array, targets_BT: jax.Array):
  """Per-position NLL and log-partition, fp32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return lse_BT - target_logit_BT, lse_BT


def nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int = 0, z_grad: bool = True,
             grad_groups: int = 1):
  """(sum of NLL, sum of log(Z)^2) over masked positions.

  `chunk_size` positions per chunk along the sequence (0: unchunked autodiff). With
  `z_grad=False` the log(Z)^2 sum carries no gradient, which lets a chunked loss
  take the fused path. `grad_groups`: partial sums kept through the chunk loop, the
  size of the mesh axis the batch is sharded over (1 when unsharded; it must divide B).
  """
  B, T, D = hidden_BTD.shape
  if chunk_size <= 0:
    nll_BT, lse_BT = _token_nll(lm_logits(hidden_BTD, head_DV, dtype), targets_BT)
    s_z = jnp.sum(jnp.square(lse_BT) * mask_BT)
    return jnp.sum(nll_BT * mask_BT), (s_z if z_grad else jax.lax.stop_gradient(s_z))
  chunk_size = min(chunk_size, T)  # one chunk: the whole sequence at once, still with the fused gradient
  if T % chunk_size:
    raise ValueError(f"train.loss_chunk_size={chunk_size} must divide data.seq_len={T}")
  if B % grad_groups:
    raise ValueError(f"grad_groups={grad_groups} must divide the batch of {B} rows")
  mask_BT = mask_BT.astype(jnp.float32)
  if not z_grad:
    s_nll, s_z = _fused_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size, grad_groups)
    return s_nll, jax.lax.stop_gradient(s_z)
  return _recompute_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size, grad_groups)


def _split(x, chunk_size: int, groups: int = 1):
  """[B, T, ...] -> [n, G, B/G, C, ...]: chunks along the sequence; the batch split into G groups of rows.

  B is sharded in contiguous blocks over `data`, so with G = the axis size each group is one device's rows.
  """
  B, T = x.shape[:2]
  x = x.reshape(groups, B // groups, T // chunk_size, chunk_size, *x.shape[2:])
  return jnp.moveaxis(x, 2, 0)


def _unsplit(x):
  n, G, b, C = x.shape[:4]
  return jnp.moveaxis(x, 0, 2).reshape(G * b, n * C, *x.shape[4:])


def _recompute_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int, groups: int):
  # One copy of the head per group, made outside the loop: autodiff then accumulates its cotangent per group
  # through the loop, and the broadcast's transpose sums the groups once, after it. The copy keeps the
  # params' dtype (cast per chunk below), so that the cotangent accumulates over chunks in fp32, not bf16.
  head_GDV = nn.with_logical_constraint(jnp.broadcast_to(head_DV, (groups, *head_DV.shape)), _PARTIAL_GDV)

  @jax.checkpoint
  def chunk_sums(h_GbCD, t_GbC, m_GbC):
    logits_GbCV = nn.with_logical_constraint(
        jnp.einsum("gbcd,gdv->gbcv", h_GbCD.astype(dtype), head_GDV.astype(dtype), preferred_element_type=jnp.float32),
        _LOGITS_GbCV)
    nll_GbC, lse_GbC = _token_nll(logits_GbCV, t_GbC)
    return jnp.sum(nll_GbC * m_GbC, axis=(1, 2)), jnp.sum(jnp.square(lse_GbC) * m_GbC, axis=(1, 2))

  def body(carry, xs):
    s_nll_G, s_z_G = chunk_sums(*xs)
    return (carry[0] + s_nll_G, carry[1] + s_z_G), None

  zero_G = jnp.zeros((groups,), jnp.float32)
  xs = tuple(_split(x, chunk_size, groups) for x in (hidden_BTD, targets_BT, mask_BT))
  with jax.named_scope(LOOP_SCOPE):
    (s_nll_G, s_z_G), _ = jax.lax.scan(body, (zero_G, zero_G), xs)
  return jnp.sum(s_nll_G), jnp.sum(s_z_G)


def _fused_forward(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int, groups: int,
                   with_grads: bool):
  """The sums and, `with_grads`, d(s_nll)/d(hidden) and d(s_nll)/d(head), one chunk of logits at a time."""
  dt = jnp.dtype(dtype)
  head_dt_DV = head_DV.astype(dt)

  def body(carry, xs):
    s_nll_G, s_z_G, dhead_GDV = carry
    h_GbCD, t_GbC, m_GbC = xs
    logits_GbCV = lm_logits(h_GbCD, head_DV, dtype, _LOGITS_GbCV)
    lse_GbC = jax.nn.logsumexp(logits_GbCV, axis=-1)
    target_logit_GbC = jnp.take_along_axis(logits_GbCV, t_GbC[..., None], axis=-1)[..., 0]
    s_nll_G = s_nll_G + jnp.sum((lse_GbC - target_logit_GbC) * m_GbC, axis=(1, 2))
    s_z_G = s_z_G + jnp.sum(jnp.square(lse_GbC) * m_GbC, axis=(1, 2))
    if not with_grads:
      return (s_nll_G, s_z_G, dhead_GDV), None
    probs_GbCV = jnp.exp(logits_GbCV - lse_GbC[..., None])
    onehot_GbCV = jnp.arange(logits_GbCV.shape[-1], dtype=t_GbC.dtype)[None, None, None, :] == t_GbC[..., None]
    dlogits_GbCV = ((probs_GbCV - onehot_GbCV) * m_GbC[..., None]).astype(dt)
    dh_GbCD = jnp.einsum("gbcv,dv->gbcd", dlogits_GbCV, head_dt_DV, preferred_element_type=jnp.float32)
    dhead_GDV = dhead_GDV + jnp.einsum("gbcd,gbcv->gdv", h_GbCD.astype(dt), dlogits_GbCV,
                                       preferred_element_type=jnp.float32)
    return (s_nll_G, s_z_G, nn.with_logical_constraint(dhead_GDV, _PARTIAL_GDV)), dh_GbCD.astype(hidden_BTD.dtype)

  zero_G = jnp.zeros((groups,), jnp.float32)
  dhead_GDV = jnp.zeros((groups, *head_DV.shape) if with_grads else (), jnp.float32)
  init = (zero_G, zero_G, nn.with_logical_constraint(dhead_GDV, _PARTIAL_GDV) if with_grads else dhead_GDV)
  xs = tuple(_split(x, chunk_size, groups) for x in (hidden_BTD, targets_BT, mask_BT))
  with jax.named_scope(LOOP_SCOPE):
    (s_nll_G, s_z_G, dhead_GDV), dh_nGbCD = jax.lax.scan(body, init, xs)
  s_nll, s_z = jnp.sum(s_nll_G), jnp.sum(s_z_G)
  if not with_grads:
    return s_nll, s_z, None, None
  # The one reduction of the LM-head gradient over the data shards.
  return s_nll, s_z, _unsplit(dh_nGbCD), jnp.sum(dhead_GDV, axis=0).astype(head_DV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_nll_sums(hidden_BTD, head_DV, targets_BT, mask_BT, dtype: str, chunk_size: int, groups: int):
  s_nll, s_z, _, _ = _fused_forward(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size, groups,
                                    with_grads=False)
  return s_nll, s_z


def _fused_fwd(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size, groups):
  s_nll, s_z, dh_BTD, dhead_DV = _fused_forward(hidden_BTD, head_DV, targets_BT, mask_BT, dtype, chunk_size, groups,
                                                with_grads=True)
  return (s_nll, s_z), (dh_BTD, dhead_DV)


def _fused_bwd(dtype, chunk_size, groups, residuals, cotangents):
  # The caller stops the gradient of s_z, so only s_nll's cotangent is ever non-zero.
  dh_BTD, dhead_DV = residuals
  g_nll, _ = cotangents
  return ((g_nll * dh_BTD).astype(dh_BTD.dtype), (g_nll * dhead_DV).astype(dhead_DV.dtype), None, None)


_fused_nll_sums.defvjp(_fused_fwd, _fused_bwd)
