"""Attention implementations on packed documents: each equals an fp64 per-document reference, and none leaks.

`xla` is checked against attention computed in float64 numpy one document at a
time; `cudnn` (jax.nn.dot_product_attention, the XLA path on CPU) and `pallas`
(the GPU flash kernel, run in Pallas interpret mode on CPU) are checked against
`xla` on the same packed rows, values and gradients, and by perturbing one
document's keys and values and watching the others' outputs stay bit-identical.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm_jax import attention, flash_attention

REPO = Path(__file__).resolve().parents[1]
B, T, N, H = 2, 128, 2, 16
# Row 0: three documents then padding; row 1: one document cut by the row end, then a short one.
SEGMENTS = np.array([[1] * 40 + [2] * 50 + [3] * 30 + [0] * 8,
                     [4] * 100 + [5] * 28], np.int32)


def _qkv(seed=0, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (B, T, N, H), dtype) for k in (kq, kk, kv)]


def _reference_fp64(q, k, v, seg):
  """Causal softmax attention computed separately inside each run of equal segment ids."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros_like(q)
  for b in range(seg.shape[0]):
    for s in np.unique(seg[b]):
      idx = np.flatnonzero(seg[b] == s)
      qs, ks, vs = q[b, idx], k[b, idx], v[b, idx]  # [t, N, H]
      scores = np.einsum("tnh,snh->nts", qs, ks) / np.sqrt(H)
      scores = np.where(np.tril(np.ones((len(idx), len(idx)), bool))[None], scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, idx] = np.einsum("nts,snh->tnh", p, vs)
  return out


IMPLS = {
    "xla": attention.xla_attention,
    "cudnn": attention.cudnn_attention,
    "pallas": lambda q, k, v, s: flash_attention.attention(q, k, v, s, interpret=True),
}


def test_xla_reference_equals_fp64_per_document_attention():
  q, k, v = _qkv()
  got = attention.xla_attention(q, k, v, jnp.asarray(SEGMENTS))
  np.testing.assert_allclose(np.asarray(got), _reference_fp64(q, k, v, SEGMENTS), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference_grads():
  q, k, v = _qkv()
  w = jax.random.normal(jax.random.key(7), (B, T, N, H))
  seg = jnp.asarray(SEGMENTS)
  loss = lambda q, k, v: jnp.sum(attention.xla_attention(q, k, v, seg) * w)
  return (q, k, v, w), attention.xla_attention(q, k, v, seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_implementation_equals_reference_values_and_grads(impl, reference_grads):
  (q, k, v, w), want_out, want_grads = reference_grads
  seg = jnp.asarray(SEGMENTS)
  fn = IMPLS[impl]
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
  for name, got, want in zip("qkv", vjp(w), want_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_attention_across_documents(impl):
  """Changing document 2's keys and values leaves every other position's output bit-identical."""
  q, k, v = _qkv(1)
  seg = jnp.asarray(SEGMENTS)
  doc2 = jnp.asarray(SEGMENTS == 2)[:, :, None, None]
  k2 = jnp.where(doc2, k + 3.0, k)
  v2 = jnp.where(doc2, -v, v)
  fn = jax.jit(IMPLS[impl])
  a, b = np.asarray(fn(q, k, v, seg)), np.asarray(fn(q, k2, v2, seg))
  others = SEGMENTS != 2
  np.testing.assert_array_equal(a[others], b[others])
  assert not np.allclose(a[~others], b[~others])  # and the change did reach document 2 itself


def test_pallas_bf16_close_to_fp32_reference():
  q, k, v = _qkv(2)
  seg = jnp.asarray(SEGMENTS)
  got = IMPLS["pallas"](*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
  assert got.dtype == jnp.bfloat16
  # bf16 inputs carry ~3 significant digits; the fp32 reference sees the same rounded inputs.
  want = attention.xla_attention(*(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)), seg)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import Mesh
    from ar_lm_jax import attention, flash_attention, sharding
    from ar_lm_jax.config import MeshConfig
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))
    seg = jnp.asarray(np.repeat(np.arange(1, 5, dtype=np.int32), 16)[None].repeat(4, 0))
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 64, 4, 16)) for i in range(3))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(MeshConfig(data=2, model=2))):
      lowered = jax.jit(lambda q, k, v, s: flash_attention.attention(q, k, v, s, interpret=True)).lower(q, k, v, seg)
      text, got = lowered.as_text(), lowered.compile()(q, k, v, seg)
    want = attention.xla_attention(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert "shard_map" in text or "sdy.manual_computation" in text, "the kernel did not run per shard"
    print("OK")
""")


def test_pallas_runs_per_shard_under_a_mesh():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
