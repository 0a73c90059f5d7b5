"""Performance settings that must not change the math, and the measuring tools.

Scan versus unrolled layers (the same parameters, stacked or not) and every
remat policy versus none give the same loss and gradients; remat really lowers
the step's memory; the FLOP count matches the parameter count and the reference;
the GPU XLA flags parse; the benchmark command prints its JSON line.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm_jax import collectives, perf
from ar_lm_jax.config import REMAT_POLICIES, ModelConfig, load_config
from ar_lm_jax.model import StableLM, abstract_params, param_count

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout

SMALL = ModelConfig(vocab_size=512, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                    max_position_embeddings=64, dtype="float32")
B, T = 2, 32


def _batch():
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 10 + [2] * 22, [3] * 25 + [0] * 7], np.int32)
  pos = np.array([list(range(10)) + list(range(22)), list(range(25)) + [0] * 7], np.int32)
  return jnp.asarray(rng.integers(0, 512, (B, T)), jnp.int32), jnp.asarray(seg), jnp.asarray(pos)


def _loss_and_grads(cfg: ModelConfig, params):
  tokens, seg, pos = _batch()

  def loss(params):
    logits = StableLM(cfg).apply({"params": params}, tokens, seg, pos)
    logp = jax.nn.log_softmax(logits[:, :-1])
    mask = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * mask)

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def scanned():
  """Parameters of the scanned model and its loss and gradients (remat none): the reference."""
  @jax.jit
  def init(key):
    params = nn.meta.unbox(StableLM(SMALL).init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    # Perturb biases and norms away from 0/1 so that every parameter matters.
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)

  params = init(jax.random.key(0))
  return params, _loss_and_grads(SMALL, params)


def _unstack(params):
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(SMALL.num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  return out


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_unrolled_equals_scanned_with_the_same_parameters(scanned):
  params, (want_loss, want_grads) = scanned
  loss, grads = _loss_and_grads(dataclasses.replace(SMALL, scan_layers=False), _unstack(params))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_trees_close(grads, _unstack(want_grads))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_equals_no_remat(scanned, policy):
  params, (want_loss, want_grads) = scanned
  loss, grads = _loss_and_grads(dataclasses.replace(SMALL, remat=policy), params)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_trees_close(grads, want_grads)


def test_remat_unrolled_equals_no_remat(scanned):
  params, (want_loss, want_grads) = scanned
  loss, grads = _loss_and_grads(dataclasses.replace(SMALL, scan_layers=False, remat="full"), _unstack(params))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_trees_close(grads, _unstack(want_grads))


def test_full_remat_lowers_step_memory():
  """Remat is not a no-op: the compiled gradient's temporaries shrink (8 x 256 tokens, activations dominate)."""
  tokens = jnp.zeros((8, 256), jnp.int32)
  temps = {}
  for policy in ("none", "full"):
    cfg = dataclasses.replace(SMALL, num_layers=4, max_position_embeddings=256, remat=policy)
    params = jax.eval_shape(lambda: nn.meta.unbox(StableLM(cfg).init(jax.random.key(0), tokens[:1, :8])["params"]))
    loss = lambda p: jnp.sum(StableLM(cfg).apply({"params": p}, tokens, return_hidden=True) ** 2)
    temps[policy] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temps["full"] < 0.6 * temps["none"], temps


def test_flops_per_token_counts_every_matmul_parameter_and_causal_attention():
  cfg = load_config("ar_stablelm_2_1_6b").model
  params = nn.meta.unbox(abstract_params(cfg))
  matrices = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if jax.tree_util.keystr(path).endswith("['kernel']"))  # q/k/v/o, MLP, LM head; not the embedding
  seq = 4096
  want = 6 * matrices + 6 * cfg.num_layers * seq * cfg.hidden_size  # QK^T and AV: 4 T D fwd, halved, x3
  assert perf.model_flops_per_token(cfg, seq) == want
  assert param_count(params) == 1_644_515_328
  assert abs(want / 9.8e9 - 1) < 0.01  # REFERENCE.md: about 9.8 GFLOP per token


def test_synthetic_batch_is_packed_like_the_pipeline():
  b = perf.synthetic_batch(4, 64, 1000, seed=3)
  seg, pos = b["segment_ids"], b["positions"]
  assert b["tokens"].dtype == np.int32 and b["tokens"].min() >= 0 and b["tokens"].max() < 1000
  assert (seg > 0).all() and (np.diff(seg, axis=1) >= 0).all()
  starts = np.concatenate([np.ones((4, 1), bool), np.diff(seg, axis=1) != 0], axis=1)
  assert (pos[starts] == 0).all()
  assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all()
  assert seg.max() > 4  # several documents per row


def test_torch_baseline_labels_score_the_positions_our_loss_scores():
  from ar_lm_jax import loss as loss_lib
  from ar_lm_jax.hf_baseline import hf_labels
  tokens, seg, _ = (np.asarray(x) for x in _batch())
  labels = hf_labels(tokens, seg)
  targets, mask = (np.asarray(x) for x in loss_lib.targets_and_mask(jnp.asarray(tokens), jnp.asarray(seg)))
  # HF predicts labels[t + 1] at position t (it shifts inside the model).
  np.testing.assert_array_equal(labels[:, 1:] != -100, mask[:, :-1])
  np.testing.assert_array_equal(labels[:, 1:][mask[:, :-1]], targets[:, :-1][mask[:, :-1]])
  assert (labels[:, 0] == -100).all() and not mask[:, -1].any()


def test_gpu_flags_are_known_to_this_xla_and_added_only_with_a_gpu(monkeypatch):
  env = {**os.environ, "XLA_FLAGS": " ".join(perf.GPU_XLA_FLAGS), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(int(jnp.ones(3).sum()))"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]  # XLA aborts on an unknown flag

  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
  monkeypatch.setattr(perf, "gpu_present", lambda: False)
  assert perf.apply_gpu_xla_flags() == [] and os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
  monkeypatch.setattr(perf, "gpu_present", lambda: True)
  added = perf.apply_gpu_xla_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_gpu_enable_triton_gemm=true" in flags and "--xla_gpu_enable_triton_gemm=false" not in flags  # the user's wins
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and len(added) == len(perf.GPU_XLA_FLAGS) - 1


def _run_benchmark(*flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "experiments.benchmark", *flags], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_benchmark_cli_prints_a_json_last_line_with_torch_comparison():
  proc = _run_benchmark("--config=tiny", "--steps=1", "--warmup=0", "--compare_torch", "--config.model.vocab_size=512",
                        "--config.data.seq_len=64", "--config.train.loss_chunk_size=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "memory_analysis" in proc.stdout
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  tokens = 8 * 64
  assert r["tokens_per_sec"] == pytest.approx(tokens / r["step_time_s"])
  assert r["model_flops_per_token"] == perf.model_flops_per_token(
      dataclasses.replace(load_config("tiny").model, vocab_size=512), 64)
  assert r["peak_flops"] > 1e9 and 0 < r["mfu"] < 1
  assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * r["model_flops_per_token"] / r["peak_flops"])
  assert r["compile_s"] > 0 and np.isfinite(r["loss"])
  assert r["collective_bytes_per_device"] == dict.fromkeys(collectives.KINDS, 0)  # one device: nothing to send
  assert r["speedup"] == pytest.approx(r["torch_step_time_s"] / r["step_time_s"])
  assert r["torch_tokens_per_sec"] == pytest.approx(tokens / r["torch_step_time_s"])


@pytest.mark.parametrize("flag", ["--steps=0", "--config.model.remat=some", "--config.train.loss_chunk_size=100", "--bogus"])
def test_benchmark_cli_bad_input_exits_2_with_one_line(flag):
  proc = _run_benchmark(flag)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")
