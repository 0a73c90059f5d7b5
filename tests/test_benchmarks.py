"""The benchmark harness outside the package: its synthetic packed batch, the torch baseline's labels, the
`experiments.benchmark` command's JSON line and its bad-input exits, and the profiler's step parts."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm_jax import collectives, flops
from ar_lm_jax.config import load_config
from benchmarks import profile_step, train_step

REPO_ROOT = Path(__file__).resolve().parents[1]


def _batch():
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 10 + [2] * 22, [3] * 25 + [0] * 7], np.int32)
  pos = np.array([list(range(10)) + list(range(22)), list(range(25)) + [0] * 7], np.int32)
  return rng.integers(0, 512, (2, 32)).astype(np.int32), seg, pos


def test_synthetic_batch_is_packed_like_the_pipeline():
  b = train_step.synthetic_batch(4, 64, 1000, seed=3)
  seg, pos = b["segment_ids"], b["positions"]
  assert b["tokens"].dtype == np.int32 and b["tokens"].min() >= 0 and b["tokens"].max() < 1000
  assert (seg > 0).all() and (np.diff(seg, axis=1) >= 0).all()
  starts = np.concatenate([np.ones((4, 1), bool), np.diff(seg, axis=1) != 0], axis=1)
  assert (pos[starts] == 0).all()
  assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all()
  assert seg.max() > 4  # several documents per row


def test_torch_baseline_labels_score_the_positions_our_loss_scores():
  from ar_lm_jax import loss as loss_lib
  from benchmarks.torch_baseline import hf_labels
  tokens, seg, _ = _batch()
  labels = hf_labels(tokens, seg)
  targets, mask = (np.asarray(x) for x in loss_lib.targets_and_mask(jnp.asarray(tokens), jnp.asarray(seg)))
  # HF predicts labels[t + 1] at position t (it shifts inside the model).
  np.testing.assert_array_equal(labels[:, 1:] != -100, mask[:, :-1])
  np.testing.assert_array_equal(labels[:, 1:][mask[:, :-1]], targets[:, :-1][mask[:, :-1]])
  assert (labels[:, 0] == -100).all() and not mask[:, -1].any()


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
  assert r["model_flops_per_token"] == flops.model_flops_per_token(
      dataclasses.replace(load_config("tiny").model, vocab_size=512), 64)
  assert r["peak_flops"] > 1e9 and 0 < r["mfu"] < 1
  assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * r["model_flops_per_token"] / r["peak_flops"])
  assert r["compile_s"] > 0 and np.isfinite(r["loss"])
  assert r["collective_bytes_per_device"] == dict.fromkeys(collectives.KINDS, 0)  # one device: nothing to send
  assert r["attention"] == "xla"  # the kernel tiny's `auto` resolved to on this platform (a flash kernel on GPU)
  assert r["speedup"] == pytest.approx(r["torch_step_time_s"] / r["step_time_s"])
  assert r["torch_tokens_per_sec"] == pytest.approx(tokens / r["torch_step_time_s"])


@pytest.mark.parametrize("flag", ["--steps=0", "--config.model.remat=some", "--config.train.loss_chunk_size=100", "--bogus",
                                  "--torch_adamw=bogus"])
def test_benchmark_cli_bad_input_exits_2_with_one_line(flag):
  proc = _run_benchmark(flag)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")


def test_profiler_names_the_part_of_the_step_of_each_op():
  hlo = ('  %fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/layers/attn/dot_general"}\n'
         '  ROOT %dot.1 = f32[2,4]{1,0} dot(%a, %b), metadata={op_name="jit(train_step)/jvp(loss)/btd,dv->btv/dot_general"}\n'
         '  %copy = f32[8]{0} copy(%p)\n')
  ops = profile_step._thunk_ops(hlo)
  assert ops == {"fusion.3": "jit(train_step)/layers/attn/dot_general",
                 "dot.1": "jit(train_step)/jvp(loss)/btd,dv->btv/dot_general"}  # no metadata: not listed
  assert [profile_step.step_part(p) for p in ops.values()] == ["decoder blocks", "LM head + cross-entropy"]
  assert profile_step.step_part("jit(train_step)/embed_tokens/gather") == "embedding"
  assert profile_step.step_part("jit(train_step)/adam/mul") == "optimizer, clipping, state update"
