"""Attention implementations on packed documents: each equals an fp64 per-document reference, and none leaks.

`xla` is checked against attention computed in float64 numpy one document at a
time; `pallas` (the GPU flash kernel) and `splash` (the TPU kernel), both run in
Pallas interpret mode on CPU, are checked against `xla` on the same packed rows,
values and gradients, and by perturbing one document's keys and values and
watching the others' outputs stay bit-identical. cuDNN cannot run here: its
per-document lengths and offsets are checked against the segments, attention
computed from those offsets alone equals the reference, and the train-step
kernel is lowered for CUDA to check what the cuDNN custom call receives.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ar_lm_jax import attention, flash_attention, sharding, splash_attention
from ar_lm_jax.config import ConfigError, Config, DataConfig, MeshConfig, ModelConfig

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
    "pallas": lambda q, k, v, s: flash_attention.attention(q, k, v, s, interpret=True),
    # Blocks of 128 (T = 128): the smallest a TPU takes, one tile per row here.
    "splash": lambda q, k, v, s: splash_attention.attention(q, k, v, s, (128, 128, 128, 128), interpret=True),
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


@pytest.mark.parametrize("impl", ["pallas", "splash"])
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


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_bf16_close_to_fp32_reference(impl):
  q, k, v = _qkv(2)
  seg = jnp.asarray(SEGMENTS)
  got = IMPLS[impl](*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
  assert got.dtype == jnp.bfloat16
  # bf16 inputs carry ~3 significant digits; the fp32 reference sees the same rounded inputs.
  want = attention.xla_attention(*(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)), seg)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


def test_kernels_run_per_shard_under_a_mesh(monkeypatch):
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  seg = jnp.asarray(np.repeat(np.arange(1, 5, dtype=np.int32), 32)[None].repeat(4, 0))
  q, k, v = (jax.random.normal(jax.random.key(i), (4, 128, 4, 16)) for i in range(3))
  want = attention.xla_attention(q, k, v, seg)
  kernels = {"pallas": lambda q, k, v, s: flash_attention.attention(q, k, v, s, interpret=True),
             "splash": lambda q, k, v, s: splash_attention.attention(q, k, v, s, interpret=True)}
  for name, fn in kernels.items():
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(MeshConfig(data=2, model=2))):
      lowered = jax.jit(fn).lower(q, k, v, seg)
      text, got = lowered.as_text(), lowered.compile()(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)
    assert "shard_map" in text or "sdy.manual_computation" in text, f"{name} did not run per shard"
  # cuDNN, lowered for CUDA (see the single-device test for the stubbed checks): each device's custom call
  # gets its own [B/data, T, N/model, H] shard and the lengths/offsets of its own rows.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  from jax.export import DisabledSafetyCheck
  monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn_fa, "is_cuda_compute_capability_equal", lambda capability: False)
  loss = lambda q, k, v, s: jnp.sum(attention.per_shard(
      lambda q, k, v, s: attention._cudnn_kernel(q, k, v, s, max_segments=8))(q, k, v, s).astype(jnp.float32))
  qkv = jax.ShapeDtypeStruct((4, 128, 4, 64), jnp.bfloat16)
  checks = [DisabledSafetyCheck.custom_call(t) for t in ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__gpu$xla.gpu.triton")]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(MeshConfig(data=2, model=2))):
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"], disabled_checks=checks)(
        qkv, qkv, qkv, jax.ShapeDtypeStruct((4, 128), jnp.int32))
  fwd = [l for l in exported.mlir_module().splitlines() if "custom_call @__cudnn$fmhaSoftmax(" in l]
  assert len(fwd) == 1 and fwd[0].split("} : (")[1].startswith(
      "tensor<2x128x2x64xbf16>, tensor<2x128x2x64xbf16>, tensor<2x128x2x64xbf16>, tensor<2x8xi32>, tensor<2x8xi32>, "
      "tensor<2x9xi32>, tensor<2x9xi32>)"), fwd


# ---- cuDNN's packed layout: per-document lengths and offsets ----

def _runs(row):
  """(start, length) of each maximal run of equal ids in a row, by a plain loop."""
  runs, start = [], 0
  for t in range(1, len(row) + 1):
    if t == len(row) or row[t] != row[start]:
      runs.append((start, t - start))
      start = t
  return runs


def _random_segments(seed, rows=3, T=T):
  """Rows of contiguous documents of random lengths (1-token documents included), some ending in padding."""
  rng = np.random.default_rng(seed)
  out = np.zeros((rows, T), np.int32)
  for b in range(rows):
    t, doc = 0, 1
    end = T - rng.integers(0, 20) * (b % 2)
    while t < end:
      n = int(min(rng.choice([1, 2, 5, 17, 40]), end - t))
      out[b, t:t + n] = doc
      t, doc = t + n, doc + 1
  return out


@pytest.mark.parametrize("M", [3, 4, 64])
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_document_seqlens_offsets_list_each_run_of_the_segments(M, seed):
  seg = SEGMENTS if seed is None else _random_segments(seed)
  seqlens, offsets, count = map(np.asarray, jax.jit(attention.document_seqlens_offsets, static_argnums=1)(jnp.asarray(seg), M))
  assert seqlens.shape == (seg.shape[0], M) and offsets.shape == (seg.shape[0], M + 1)
  for b, row in enumerate(seg):
    runs = _runs(row)
    assert count[b] == len(runs)
    if len(runs) > M:  # the caller falls back to the Pallas kernel; the last slot covers the rest of the row
      runs = runs[:M - 1] + [(runs[M - 1][0], len(row) - runs[M - 1][0])]
    want_len = [n for _, n in runs] + [-1] * (M - len(runs))
    want_off = [s for s, _ in runs] + [-1] * (M + 1 - len(runs))
    np.testing.assert_array_equal(seqlens[b], want_len)
    np.testing.assert_array_equal(offsets[b], want_off)


def _attention_from_offsets_fp64(q, k, v, seqlens, offsets):
  """What cuDNN's packed causal attention computes: causal softmax inside [offset, offset + length) of each listed document."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.full_like(q, np.nan)  # a token no document covers stays NaN
  for b in range(q.shape[0]):
    for n, s in zip(seqlens[b], offsets[b]):
      if n < 0:
        continue
      qs, ks, vs = q[b, s:s + n], k[b, s:s + n], v[b, s:s + n]
      scores = np.einsum("tnh,snh->nts", qs, ks) / np.sqrt(q.shape[-1])
      scores = np.where(np.tril(np.ones((n, n), bool))[None], scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      out[b, s:s + n] = np.einsum("nts,snh->tnh", p / p.sum(-1, keepdims=True), vs)
  return out


def test_attention_from_the_cudnn_offsets_equals_the_reference():
  """The lengths and offsets alone (all cuDNN sees of the documents) give the reference attention, padding included."""
  q, k, v = _qkv(3)
  for seg in (SEGMENTS, _random_segments(2, rows=B)):
    seqlens, offsets, count = map(np.asarray, attention.document_seqlens_offsets(jnp.asarray(seg), 64))
    assert count.max() <= 64
    np.testing.assert_allclose(_attention_from_offsets_fp64(q, k, v, seqlens, offsets), _reference_fp64(q, k, v, seg),
                               rtol=1e-12, atol=1e-12)


def _cudnn_by_offsets(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *, scale, mask_type, qkv_layout):
  """Stands in for cuDNN's packed causal attention on CPU: attention inside [offset, offset + length) of each listed document."""
  assert qkv_layout == "BTNH" and mask_type.name == "CAUSAL" and scale == q.shape[-1] ** -0.5
  t_T = jnp.arange(q.shape[1])
  start_BM, n_BM = q_offsets[:, :-1], q_seqlen
  inside_BMT = (t_T[None, None] >= start_BM[..., None]) & (t_T[None, None] < (start_BM + n_BM)[..., None]) & (n_BM[..., None] > 0)
  doc_BT = jnp.where(inside_BMT.any(1), jnp.argmax(inside_BMT, axis=1), -1 - t_T[None])  # a token no document covers sees itself only
  return attention.xla_attention(q, k, v, doc_BT)


@pytest.mark.parametrize("M", [4, 3])  # row 0 holds 4 documents (padding included): M = 3 must take the Pallas kernel
def test_cudnn_path_with_more_documents_than_m_falls_back_to_pallas(M, monkeypatch, reference_grads):
  """The cuDNN path end to end on CPU, values and gradients, with cuDNN emulated from its offsets and Pallas interpreted."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  monkeypatch.setattr(cudnn_fa, "dot_product_attention", _cudnn_by_offsets)
  pallas_kernel = flash_attention.kernel  # the GPU kernel, in interpret mode here
  monkeypatch.setattr(flash_attention, "kernel", lambda q, k, v, s, interpret: pallas_kernel(q, k, v, s, interpret=True))
  (q, k, v, w), want_out, want_grads = reference_grads
  seg = jnp.asarray(SEGMENTS)
  out, vjp = jax.vjp(jax.jit(lambda q, k, v: attention._cudnn_kernel(q, k, v, seg, max_segments=M)), q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
  for name, got, want in zip("qkv", vjp(w), want_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_cudnn_kernel_lowered_for_cuda_receives_lengths_and_offsets_not_a_bias(monkeypatch):
  """Lowers the train-step kernel (forward and backward) for CUDA on this CPU host and reads the cuDNN custom calls.

  jax checks the local cuDNN version and GPU generation while tracing; there is
  none here, so those three checks are stubbed as an H100 with cuDNN 9.10
  would answer them. Nothing runs: only a GPU can confirm the kernel's numbers.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  from jax.export import DisabledSafetyCheck
  monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn_fa, "is_cuda_compute_capability_equal", lambda capability: False)
  Bc, Tc, Nc, Hc, M = 2, 256, 4, 64, 8
  loss = lambda q, k, v, s: jnp.sum(attention._cudnn_kernel(q, k, v, s, max_segments=M).astype(jnp.float32))
  qkv = jax.ShapeDtypeStruct((Bc, Tc, Nc, Hc), jnp.bfloat16)
  targets = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__gpu$xla.gpu.triton")
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                               disabled_checks=[DisabledSafetyCheck.custom_call(t) for t in targets])(
                                   qkv, qkv, qkv, jax.ShapeDtypeStruct((Bc, Tc), jnp.int32))
  calls = {}
  for line in exported.mlir_module().splitlines():
    m = re.search(r"custom_call @([\w$.]+)\(.*\} : \(([^)]*)\) ->", line)
    if m:
      calls.setdefault(m.group(1), []).append((m.group(2), line))
  assert set(calls) == set(targets), sorted(calls)  # cuDNN forward and backward, and the Pallas fallback for > M documents
  operands, line = calls["__cudnn$fmhaSoftmax"][0]
  qkv_t, seqlen_t, offset_t = f"tensor<{Bc}x{Tc}x{Nc}x{Hc}xbf16>", f"tensor<{Bc}x{M}xi32>", f"tensor<{Bc}x{M + 1}xi32>"
  # q, k, v, then q/kv lengths [B, M] and q/kv offsets [B, M+1]: no [B, N, T, S] bias operand, so no bias gradient.
  assert [t.strip() for t in operands.split(",")] == [qkv_t] * 3 + [seqlen_t] * 2 + [offset_t] * 2
  config = line.replace("\\22", '"')
  for want in ('"mask_type": "CAUSAL"', f'"max_seg_per_batch": {M}', '"is_flash_attention": true', f'"fmha_scale": {Hc ** -0.5}'):
    assert want in config, want
  assert not re.search(rf"tensor<(\d+x)*{Tc}x{Tc}x", exported.mlir_module())  # no [.., T, S] mask, bias or scores


def test_splash_lowers_for_tpu_at_the_recipe_shape():
  """Mosaic lowering (jax's half of a TPU compile) of forward and backward for one device's [6, 4096, 32, 64] bf16.

  The serialized kernels are compiled by libtpu only on a TPU or in the TPU dry run.
  """
  loss = lambda q, k, v, s: jnp.sum(splash_attention.attention(q, k, v, s, interpret=False).astype(jnp.float32))
  qkv = jax.ShapeDtypeStruct((6, 4096, 32, 64), jnp.bfloat16)
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
      qkv, qkv, qkv, jax.ShapeDtypeStruct((6, 4096), jnp.int32))
  text = exported.mlir_module()
  assert set(re.findall(r"custom_call @([\w$.]+)", text)) == {"tpu_custom_call"}
  assert sorted(set(re.findall(r'kernel_name = "([^"]+)"', text))) == [
      "splash_mha_dkv_segmented_no_residuals", "splash_mha_dq_segmented_no_residuals", "splash_mha_fwd_segmented_residuals"]
  assert "4096x4096" not in text  # no [T, S] mask or scores anywhere in the program


# ---- auto, the config, the model ----

def test_auto_resolves_to_the_flash_kernel_of_each_platform():
  bf16, fp32 = ModelConfig(attention="auto", dtype="bfloat16"), ModelConfig(attention="auto")
  assert [attention.resolve_attention(bf16, p) for p in ("gpu", "cuda", "tpu", "cpu")] == ["cudnn", "cudnn", "splash", "xla"]
  assert attention.resolve_attention(fp32, "gpu") == "pallas"  # cuDNN's flash kernel takes only bf16/fp16
  for impl in ("xla", "cudnn", "pallas", "splash"):
    explicit = ModelConfig(attention=impl, dtype="bfloat16")
    assert {attention.resolve_attention(explicit, p) for p in ("gpu", "tpu", "cpu")} == {impl}


@pytest.mark.devices(1)  # the dry run below builds a one-device mesh (conftest.py gives the tests 8)
def test_recipe_and_dry_run_name_a_flash_kernel_for_gpu():
  from ar_lm_jax.config import apply_overrides, load_config
  from ar_lm_jax.dry_run import dry_run
  recipe = load_config("ar_stablelm_2_1_6b")
  assert recipe.model.attention == "auto"
  assert attention.resolve_attention(recipe.model, "gpu") == "cudnn"
  assert attention.resolve_attention(recipe.model, "tpu") == "splash"
  tiny = apply_overrides(load_config("tiny"), {"mesh.data": "1", "model.dtype": "bfloat16"})
  assert dry_run(tiny, memory_analysis=False)["attention"] == "cudnn"


def test_config_checks_attention_and_splash_blocks():
  with pytest.raises(ConfigError, match="model.attention"):
    ModelConfig(attention="flash")
  with pytest.raises(ConfigError, match="model.attention: cudnn's flash kernel takes bf16 only"):
    ModelConfig(attention="cudnn", dtype="float32")
  with pytest.raises(ConfigError, match="model.splash_block_kv"):
    ModelConfig(splash_block_kv=100)
  with pytest.raises(ConfigError, match="model.splash_block_q"):
    Config(model=ModelConfig(attention="splash", max_position_embeddings=640), data=DataConfig(seq_len=640))
  Config(model=ModelConfig(attention="splash", max_position_embeddings=640, splash_block_q=128, splash_block_kv=128,
                           splash_block_q_dkv=128, splash_block_kv_dkv=128), data=DataConfig(seq_len=640))


def test_model_with_splash_equals_model_with_reference():
  """The whole StableLM forward on packed rows with model.attention=splash (interpret mode here) against xla."""
  from ar_lm_jax.model import StableLM
  cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                    max_position_embeddings=T, attention="xla")
  tokens = jax.random.randint(jax.random.key(4), (B, T), 0, 256)
  seg = jnp.asarray(SEGMENTS)
  positions = jnp.asarray([[t - s for s, n in _runs(row) for t in range(s, s + n)] for row in SEGMENTS])
  params = jax.jit(StableLM(cfg).init)(jax.random.key(5), tokens, seg, positions)
  forward = lambda c: jax.jit(StableLM(c).apply)(params, tokens, seg, positions)  # jitted: interpret mode is slow eagerly
  want = forward(cfg)
  got = forward(dataclasses.replace(cfg, attention="splash", splash_block_q=128, splash_block_kv=128))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
