"""The train step (gradient accumulation, non-finite skips) and `python -m experiments.train` end to end."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ar_lm_jax import optim, sharding
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]


def packed_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """Random rows of several documents each, with padding at the end of some rows."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, vocab, (batch_size, seq_len)).astype(np.int32)
  segments = np.zeros((batch_size, seq_len), np.int32)
  positions = np.zeros((batch_size, seq_len), np.int32)
  for b in range(batch_size):
    t, seg = 0, 1
    end = seq_len - rs.randint(0, seq_len // 4)
    while t < end:
      n = min(rs.randint(3, seq_len // 2), end - t)
      segments[b, t:t + n] = seg
      positions[b, t:t + n] = np.arange(n)
      t, seg = t + n, seg + 1
  return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def run_steps(cfg, batches):
  setup = step_lib.build(cfg, jax.devices()[:1])
  state = step_lib.init_state(setup, seed=0)
  step = step_lib.jit_train_step(setup)
  out = []
  with setup.activate():
    for b in batches:
      state, m = step(state, sharding.global_batch(b, setup.mesh))
      out.append(jax.device_get(m))
  return state, out


def test_grad_accumulation_equals_one_large_batch():
  base = apply_overrides(load_config("tiny"), {"data.seq_len": "64", "data.batch_size": "8"})
  accum = apply_overrides(base, {"optim.grad_accum_steps": "4"})
  batch = packed_batch(8, 64, 1000, seed=1)
  setup = step_lib.build(base, jax.devices()[:1])
  params = step_lib.init_state(setup, seed=0).params
  results = []
  for cfg in (base, accum):
    fn = jax.jit(functools.partial(step_lib.loss_and_grads, model=setup.model, cfg=cfg))
    with setup.activate():
      results.append(jax.device_get(fn(params, sharding.global_batch(batch, setup.mesh))))
  (loss1, g1, n1), (loss4, g4, n4) = results
  assert n1 == n4 and abs(loss1 - loss4) <= 1e-5 * abs(loss1)
  diff = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4))))
  norm = np.sqrt(sum(float(np.sum(a ** 2)) for a in jax.tree.leaves(g1)))
  assert diff <= 1e-5 * norm
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max() + 1e-12


def test_accumulated_train_step_matches():
  """Through the whole jitted step: same loss and gradient norm with and without accumulation."""
  base = apply_overrides(load_config("tiny"), {"data.seq_len": "64", "data.batch_size": "8"})
  batches = [packed_batch(8, 64, 1000, seed=s) for s in (1, 2)]
  _, m1 = run_steps(base, batches)
  _, m4 = run_steps(apply_overrides(base, {"optim.grad_accum_steps": "4"}), batches)
  for a, b in zip(m1, m4):
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(a["grad_norm"])


def test_non_finite_step_is_skipped():
  cfg = apply_overrides(load_config("tiny"), {"data.seq_len": "32", "data.batch_size": "2"})
  setup = step_lib.build(cfg, jax.devices()[:1])
  state = step_lib.init_state(setup, seed=0)
  before = jax.device_get(state.params)
  # Poison one weight: the loss becomes NaN, so the update must leave params and moments alone.
  poisoned = jax.tree.map(lambda x: x, state)
  emb = np.asarray(before["embed_tokens"]["embedding"]).copy()
  emb[5, 0] = np.nan
  poisoned.params["embed_tokens"]["embedding"] = jax.device_put(emb, setup.state_shardings.params["embed_tokens"]["embedding"])
  batch = packed_batch(2, 32, 1000)
  batch["tokens"][0, 3] = 5
  step = step_lib.jit_train_step(setup)
  with setup.activate():
    new, m = step(poisoned, sharding.global_batch(batch, setup.mesh))
  m = jax.device_get(m)
  assert not bool(m["finite"]) and int(m["skipped_steps"]) == 1
  after = jax.device_get(new.params)
  np.testing.assert_array_equal(after["lm_head"]["kernel"], before["lm_head"]["kernel"])
  assert int(new.step) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=tiny", f"--workdir={workdir}",
       "--config.train.steps=30", "--config.train.log_every=1", "--config.train.progress=false",
       "--config.train.eval_every=0"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return workdir, rows, proc


def test_cli_run_writes_metrics_and_loss_falls(tiny_run):
  workdir, rows, proc = tiny_run
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 31))
  for r in train_rows:
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
  assert train_rows[-1]["loss"] < 0.85 * train_rows[0]["loss"]
  assert str(workdir / "metrics.jsonl") in proc.stdout and "checkpoints" in proc.stdout
  assert any((workdir / "checkpoints").iterdir())


def test_logged_lr_equals_schedule(tiny_run):
  _, rows, _ = tiny_run
  cfg = apply_overrides(load_config("tiny"), {"train.steps": "30"})
  schedule = optim.build_schedule(cfg.optim, cfg.train.steps)
  for r in rows:
    if "lr" in r:
      assert r["lr"] == pytest.approx(float(schedule(r["step"])), rel=1e-6, abs=1e-12)


def test_unknown_config_key_exits_2_with_one_line():
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config=tiny", "--config.train.stepz=3"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "train.stepz" in lines[0] and "Traceback" not in proc.stderr


def test_skipped_steps_do_not_shift_the_lr_schedule(monkeypatch):
  """Steps 3 and 4 are made non-finite; every applied update s still uses lr = schedule(s), and the cooldown
  reaches 0. The applied lr is read back from the update itself: AdamW's new params are
  p - lr * (mu_hat / (sqrt(nu_hat) + eps) + wd * p), with mu, nu and the count from the new optimizer state,
  so lr = -(p_new - p) . d / (d . d), computed in float64."""
  cfg = apply_overrides(load_config("tiny"), {
      "data.seq_len": "32", "data.batch_size": "2", "train.steps": "8",
      "optim.phases": '[{"kind": "linear_warmup", "steps": 4, "end_lr": 0.01}, {"kind": "linear_decay", "steps": 4, "end_lr": 0.0}]'})
  bad_steps = {3, 4}
  original = step_lib.loss_and_grads

  def poisoned(params, batch, **kw):  # a batch whose first position is -1 makes the step non-finite
    loss, grads, n = original(params, batch, **kw)
    return jax.numpy.where(batch["positions"][0, 0] < 0, jax.numpy.nan, loss), grads, n

  monkeypatch.setattr(step_lib, "loss_and_grads", poisoned)
  setup = step_lib.build(cfg, jax.devices()[:1])
  schedule = optim.build_schedule(cfg.optim, cfg.train.steps)
  state = step_lib.init_state(setup, seed=0)
  step = step_lib.jit_train_step(setup)
  o = cfg.optim
  mask = optim.decay_mask(state.params, o.decay_embeddings)
  with setup.activate():
    for s in range(1, 9):
      batch = packed_batch(2, 32, 1000, seed=s)
      if s in bad_steps:
        batch["positions"][0, 0] = -1
      before = jax.device_get(state.params)
      state, m = step(state, sharding.global_batch(batch, setup.mesh))
      m = jax.device_get(m)
      assert bool(m["finite"]) == (s not in bad_steps) and int(m["skipped_steps"]) == len(bad_steps & set(range(s + 1)))
      assert m["lr"] == pytest.approx(float(schedule(s)), rel=1e-6, abs=0)
      if s in bad_steps:
        continue
      adam = jax.device_get(state.opt_state[1])
      c = int(adam.count)
      num = den = 0.0
      for p, p_new, mu, nu, dec in zip(*(jax.tree.leaves(t) for t in (before, state.params, adam.mu, adam.nu, mask))):
        p, mu, nu = (np.asarray(x, np.float64) for x in (p, mu, nu))
        d = (mu / (1 - o.b1 ** c)) / (np.sqrt(nu / (1 - o.b2 ** c)) + o.eps) + (o.weight_decay * p if dec else 0.0)
        num -= float(np.sum((np.asarray(jax.device_get(p_new), np.float64) - p) * d))
        den += float(np.sum(d * d))
      # fp32 params: the update is rounded to the params' precision (|p| ~ 0.02, eps32 ~ 1e-7 relative).
      assert num / den == pytest.approx(float(schedule(s)), rel=1e-3, abs=1e-7), f"step {s}"
  assert float(schedule(8)) == 0.0
