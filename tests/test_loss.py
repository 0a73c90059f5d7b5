"""Cross-entropy over packed rows: the unchunked loss against float64, and both chunked paths against it.

The fused path (no z-loss) computes the LM-head gradients inside the forward
under a custom VJP; the recompute path (z-loss on) rematerializes each chunk.
Both must give the unchunked loss and the unchunked gradients, and the chunked
step must not hold the fp32 logits of the whole micro-batch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm_jax import loss as loss_lib
from ar_lm_jax import sharding
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import MeshConfig, load_config

B, T, D, V = 2, 16, 8, 50
SEGMENTS = np.array([[1] * 5 + [2] * 9 + [0] * 2, [3] * 16], np.int32)


@pytest.fixture(scope="module")
def inputs():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(k1, (B, T, D))
  head = jax.random.normal(k2, (D, V))
  tokens = jax.random.randint(k3, (B, T), 0, V)
  targets, mask = loss_lib.targets_and_mask(tokens, jnp.asarray(SEGMENTS))
  return hidden, head, targets, mask


def test_targets_and_mask_score_only_within_a_document(inputs):
  _, _, _, mask = inputs
  want = np.zeros((B, T), bool)
  want[0, 0:4] = True  # document 1: positions 0..3 predict 1..4
  want[0, 5:13] = True  # document 2: 5..12 predict 6..13; 13 would predict padding
  want[1, 0:15] = True  # last position has no next token
  np.testing.assert_array_equal(np.asarray(mask), want)


def test_unchunked_equals_float64(inputs):
  hidden, head, targets, mask = inputs
  s_nll, s_z = loss_lib.nll_sums(hidden, head, targets, mask, "float32")
  logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  m = np.asarray(mask)
  np.testing.assert_allclose(float(s_nll), (nll * m).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(s_z), (lse ** 2 * m).sum(), rtol=1e-6)


def _value_and_grads(inputs, chunk, z_loss):
  hidden, head, targets, mask = inputs

  def objective(hidden, head):
    s_nll, s_z = loss_lib.nll_sums(hidden, head, targets, mask, "float32", chunk, z_grad=z_loss > 0)
    return s_nll + z_loss * s_z, (s_nll, s_z)

  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(hidden, head)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["fused", "recompute"])
@pytest.mark.parametrize("chunk", [4, 16])  # several chunks; one chunk as long as the sequence
def test_chunked_equals_unchunked_value_and_grads(inputs, chunk, z_loss):
  (want_obj, (want_nll, want_z)), want_g = _value_and_grads(inputs, 0, z_loss)
  (obj, (nll, z)), g = _value_and_grads(inputs, chunk, z_loss)
  np.testing.assert_allclose(float(nll), float(want_nll), rtol=1e-6)
  np.testing.assert_allclose(float(z), float(want_z), rtol=1e-6)
  np.testing.assert_allclose(float(obj), float(want_obj), rtol=1e-6)
  for name, got, want in zip(("hidden", "head"), g, want_g):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)


def test_fused_bf16_matches_unchunked_bf16(inputs):
  """bf16 compute (fp32 logits and softmax): the same loss; gradients one bf16 rounding apart.

  Unchunked autodiff multiplies the fp32 softmax gradient into an upcast head, the fused path rounds it to
  bf16 first (a bf16 matmul operand), so elementwise the two differ where terms cancel; both are checked
  against float64 in test_bf16_compute_gives_fp32_logits.
  """
  hidden, head, targets, mask = inputs

  def grads(chunk):
    f = lambda h, w: loss_lib.nll_sums(h, w, targets, mask, "bfloat16", chunk, z_grad=False)[0]
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden.astype(jnp.bfloat16), head)

  (want, want_g), (got, got_g) = grads(0), grads(4)
  assert got_g[0].dtype == jnp.bfloat16 and got_g[1].dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(got_g, want_g):  # one bf16 rounding of the softmax gradient apart, norm-wise
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.linalg.norm(g - w) <= 2 ** -8 * np.linalg.norm(w)


def test_fused_path_scales_by_the_cotangent(inputs):
  """The custom VJP must use the incoming cotangent, not assume 1: grad of 3*s_nll is 3x grad of s_nll."""
  hidden, head, targets, mask = inputs
  f = lambda h, c: c * loss_lib.nll_sums(h, head, targets, mask, "float32", 4, z_grad=False)[0]
  g1 = jax.grad(f)(hidden, 1.0)
  g3 = jax.grad(f)(hidden, 3.0)
  np.testing.assert_allclose(np.asarray(g3), 3 * np.asarray(g1), rtol=1e-6)


def test_chunk_must_divide_the_sequence(inputs):
  hidden, head, targets, mask = inputs
  with pytest.raises(ValueError, match="must divide"):
    loss_lib.nll_sums(hidden, head, targets, mask, "float32", 5)


def test_train_step_gradients_with_chunked_loss_sharded_and_accumulated():
  """The fused loss inside the real step (value_and_grad with aux, micro-batch scan) on a data x model mesh
  with FSDP matches the unchunked loss and gradients."""
  base = load_config("tiny")
  base = base.replace(model=dataclasses.replace(base.model, vocab_size=512),
                      data=dataclasses.replace(base.data, seq_len=32, batch_size=16),
                      optim=dataclasses.replace(base.optim, grad_accum_steps=2),
                      mesh=MeshConfig(data=4, model=2, fsdp=True))
  rng = np.random.default_rng(0)
  seg = np.repeat(np.arange(1, 5, dtype=np.int32), 8)[None].repeat(16, 0)
  batch_np = {"tokens": rng.integers(0, 512, (16, 32)).astype(np.int32), "segment_ids": seg,
              "positions": np.tile(np.arange(8, dtype=np.int32), 4)[None].repeat(16, 0)}
  out = []
  for chunk in (0, 8):
    cfg = base.replace(train=dataclasses.replace(base.train, loss_chunk_size=chunk))
    setup = step_lib.build(cfg, jax.devices()[:8])
    params = step_lib.init_state(setup, 0).params
    fn = jax.jit(lambda p, b, cfg=cfg: step_lib.loss_and_grads(p, b, model=setup.model, cfg=cfg))
    with setup.activate():
      out.append(jax.device_get(fn(params, sharding.global_batch(batch_np, setup.mesh))))
  (loss0, g0, _), (loss1, g1, _) = out
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_chunked_loss_never_holds_the_full_fp32_logits():
  """Compiled temp memory of the chunked loss and its gradients stays below one [B, T, V] fp32 logits buffer."""
  b, t, d, v = 8, 128, 64, 100352
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.bool_))
  logits_bytes = b * t * v * 4
  for chunk, z_grad in ((16, False), (16, True)):
    f = lambda h, w, tg, m: loss_lib.nll_sums(h, w, tg, m, "float32", chunk, z_grad=z_grad)[0]
    temp = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < logits_bytes / 2, f"chunk {chunk} z_grad {z_grad}: temp {temp / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"
  f = lambda h, w, tg, m: loss_lib.nll_sums(h, w, tg, m, "float32", 0)[0]
  temp = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp >= logits_bytes  # the unchunked loss does hold them: the bound above means something


@pytest.mark.parametrize("chunk,z_grad", [(0, True), (4, False), (4, True)], ids=["unchunked", "fused", "recompute"])
def test_bf16_compute_gives_fp32_logits(chunk, z_grad):
  """bf16 operands, fp32 accumulation and fp32 logits: per-token NLL and gradients equal a float64 computation
  on the same bf16-rounded operands. Logits of magnitude ~16 (a trained model's range): rounding them to bf16
  before the softmax would move each token's NLL by ~0.03 nats and the softmax gradient by ~2%."""
  b, t, d, v = 2, 8, 256, 512
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(k1, (b, t, d)).astype(jnp.bfloat16)
  head = jax.random.normal(k2, (d, v))
  tokens = jax.random.randint(k3, (b, t), 0, v)
  targets, mask = loss_lib.targets_and_mask(tokens, jnp.ones((b, t), jnp.int32))
  onehots = jnp.eye(b * t, dtype=bool).reshape(b * t, b, t) & mask[None]

  def s_nll(h, w, m):
    return loss_lib.nll_sums(h, w, targets, m, "bfloat16", chunk, z_grad=z_grad)[0]

  per_token = jax.jit(jax.vmap(s_nll, in_axes=(None, None, 0)))(hidden, head, onehots).reshape(b, t)
  g_hidden, g_head = jax.jit(jax.grad(s_nll, argnums=(0, 1)))(hidden, head, mask)

  h64 = np.asarray(hidden, np.float64)
  w64 = np.asarray(head.astype(jnp.bfloat16), np.float64)  # the operand the bf16 matmul sees
  logits = h64 @ w64
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  m = np.asarray(mask, np.float64)
  want_nll = (lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]) * m
  dlogits = (np.exp(logits - lse[..., None]) - np.eye(v)[np.asarray(targets)]) * m[..., None]
  want_g_hidden = dlogits @ w64.T
  want_g_head = np.einsum("btd,btv->dv", h64, dlogits)
  # fp32 accumulation over 256 bf16 products: ~1e-5 on a logit of ~16, nowhere near bf16's 2^-9 * 16 = 0.03.
  np.testing.assert_allclose(np.asarray(per_token, np.float64), want_nll, rtol=0, atol=2e-4)
  # Gradients: the softmax gradient is a bf16 matmul operand (and d/d(hidden) is returned in bf16), so one bf16
  # rounding (2^-8 relative) is the budget; bf16 logits would add ~2% error to the probabilities.
  for name, got, want in (("hidden", g_hidden, want_g_hidden), ("head", g_head, want_g_head)):
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err <= 2 ** -8, f"{name}: relative error {err:.2e}"
