"""loop.py end to end: `python -m experiments.train` in subprocesses, 2 fake CPU devices, fp32.

Every run is compared with one uninterrupted 20-step run, loss by loss and batch by batch
(`data/batch_hash`), for bitwise equality:
- exact resume: 10 steps (train.stop_after=10), then the same command again, to step 20;
- preemption, then a crash: SIGTERM after a few steps -> exit 0 with a checkpoint at the step
  reached; the re-run (saving every step) is SIGKILLed while an async save is being written; the
  next run moves the unfinished save aside, restores the last finished step and goes on to 20;
- non-finite steps: batches with an out-of-range token id (the embedding gather reads NaN) are
  skipped and counted, a due checkpoint waits for a finite step, and train.max_bad_steps in a row
  stop the run (exit 1) with the last good checkpoint the newest one;
- no usable checkpoint: exit 2 with a one-line error.
The runs share a JAX compilation cache, so only the first one compiles the train step.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

from ar_lm_jax import loop
from ar_lm_jax.checkpoint import UNFINISHED_SUFFIX
from run_testing import assert_same_steps, metrics, steps_saved

REPO = Path(__file__).resolve().parents[1]
# tiny, narrower (the 100352-row LM head and its softmax are most of a step) and on shorter rows.
ARGS = ["--config=tiny", "--config.model.num_heads=2", "--config.model.hidden_size=16", "--config.data.seq_len=32",
        "--config.data.batch_size=4", "--config.train.steps=20", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.progress=false"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def command(workdir, extra, script=None):
  head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "experiments.train"]
  return head + ARGS + [f"--workdir={workdir}", *extra]


def train(env, workdir, *extra, script=None, expect=0):
  proc = subprocess.run(command(workdir, extra, script), env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=TIMEOUT)
  assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


def start(env, workdir, *extra):
  return subprocess.Popen(command(workdir, extra), env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  train(env, workdir, "--config.checkpoint.every_steps=10")
  m = metrics(workdir)
  assert sorted(m) == list(range(1, 21)) and steps_saved(workdir) == [10, 20]
  assert len({m[s]["data/batch_hash"] for s in m}) == 20  # every step sees another batch
  return m


def test_resume_after_10_steps_is_bitwise_the_uninterrupted_run(env, reference, tmp_path):
  train(env, tmp_path, "--config.checkpoint.every_steps=10", "--config.train.stop_after=10")
  assert sorted(metrics(tmp_path)) == list(range(1, 11)) and steps_saved(tmp_path) == [10]
  again = train(env, tmp_path, "--config.checkpoint.every_steps=10")
  assert f"resuming from checkpoint step 10 in {tmp_path}/checkpoints" in again.stdout
  assert "train.stop_after: 10 -> 0" in again.stdout  # the one config change is reported
  m = metrics(tmp_path)
  assert sorted(m) == list(range(1, 21))
  assert_same_steps(m, reference, range(1, 21))
  assert steps_saved(tmp_path) == [10, 20]


def wait_for(cond, proc, what, timeout=TIMEOUT):
  t0 = time.monotonic()
  while not cond():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
    if time.monotonic() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.005)


def unfinished(workdir) -> list[str]:
  return [p.name for p in (Path(workdir) / "checkpoints").glob(f"*{UNFINISHED_SUFFIX}*")]


def test_sigterm_then_sigkill_in_a_save_then_an_exact_finish(env, reference, tmp_path):
  # 1. SIGTERM once a few steps are logged: exit 0, a checkpoint at the step reached (no periodic saves).
  run = start(env, tmp_path, "--config.checkpoint.every_steps=0")
  wait_for(lambda: len(metrics(tmp_path)) >= 3, run, "3 logged steps")
  run.send_signal(signal.SIGTERM)
  t0 = time.monotonic()
  out, err = run.communicate(timeout=TIMEOUT)
  exit_s = time.monotonic() - t0
  assert run.returncode == 0, err[-3000:]
  stopped = int(re.search(r"SIGTERM: stopped at step (\d+)", out).group(1))
  assert steps_saved(tmp_path) == [stopped] and max(metrics(tmp_path)) == stopped >= 3
  assert exit_s < 60, f"took {exit_s:.1f}s from SIGTERM to exit"
  print(f"SIGTERM -> exit 0 in {exit_s:.1f}s at step {stopped}")

  # 2. The same command resumes there; saving every step, it is SIGKILLed while a save is half-written.
  for attempt in range(3):  # the save may finish between seeing it and the kill; then try again
    run = start(env, tmp_path, "--config.checkpoint.every_steps=1")
    wait_for(lambda: unfinished(tmp_path), run, "an async save in progress")
    run.kill()
    run.communicate(timeout=TIMEOUT)
    if unfinished(tmp_path):
      break
  else:
    pytest.fail("never caught a save in progress in 3 attempts")
  (partial,) = unfinished(tmp_path)
  last_finished = max(steps_saved(tmp_path))
  assert last_finished >= stopped and int(partial.split(".")[0]) > last_finished

  # 3. The next run keeps the unfinished save aside, restores the last finished step, and ends like the reference.
  done = train(env, tmp_path, "--config.checkpoint.every_steps=10")
  assert f"resuming from checkpoint step {last_finished} in" in done.stdout
  assert partial in done.stderr and "never finished" in done.stderr
  assert not unfinished(tmp_path) and list((tmp_path / "checkpoints").glob(f"{partial.split('.')[0]}.partial-*"))
  m = metrics(tmp_path)
  assert sorted(m) == list(range(1, 21))
  assert_same_steps(m, reference, range(1, 21))


# Runs experiments.train with the batches of the given steps corrupted by a token id past the vocab.
NAN_DRIVER = r"""
import runpy, sys
from ar_lm_jax import data
BAD = {int(s) for s in sys.argv[1].split(",")}
make = data.make_train_iterator

class OutOfRangeToken:
  def __init__(self, it):
    self.it = it
  def __iter__(self):
    return self
  def __next__(self):
    batch = next(self.it)
    if self.it.step in BAD:
      batch = dict(batch, tokens=batch["tokens"].copy())
      batch["tokens"][0, 0] = 10**6
    return batch
  def __getattr__(self, name):
    return getattr(self.it, name)

data.make_train_iterator = lambda *a, **k: OutOfRangeToken(make(*a, **k))
sys.argv = ["experiments.train"] + sys.argv[2:]
runpy.run_module("experiments.train", run_name="__main__")
"""


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(env, tmp_path):
  driver = NAN_DRIVER.replace("sys.argv[1]", "'5,6,9,10,11'")
  proc = train(env, tmp_path, "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
               "--config.train.max_bad_steps=3", script=driver, expect=1)
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: stopped: 3 consecutive steps (9-11) had a non-finite loss or gradient "
                         "(train.max_bad_steps=3)") and "the last good checkpoint is step 8" in last
  m = metrics(tmp_path)
  assert [m[s]["loss"] for s in (5, 6, 9, 10, 11)] == ["nan"] * 5
  assert all(isinstance(m[s]["loss"], float) for s in (1, 2, 3, 4, 7, 8))
  assert [m[s]["skipped_steps"] for s in range(1, 12)] == [0, 0, 0, 0, 1, 2, 2, 2, 3, 4, 5]
  # Step 6's save waited for step 7; nothing was saved after step 8, so the newest checkpoint is the last good one.
  assert steps_saved(tmp_path) == [2, 4, 7, 8]


def test_no_usable_checkpoint_exits_2_with_one_line(env, tmp_path):
  (tmp_path / "checkpoints" / "10" / "state").mkdir(parents=True)  # a step whose items never made it
  proc = train(env, tmp_path, expect=2)
  assert "checkpoint step 10" in proc.stderr and "missing" in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no usable checkpoint in ") and "Traceback" not in proc.stderr
  assert list((tmp_path / "checkpoints").glob("10.corrupt-*"))


# ---------------------------------------------------------------------------
# Loop control: stop requests and non-finite steps.


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_request_takes_one_signal_then_hands_back_the_handlers(sig):
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  stop = loop.StopRequest(check_every=10).install()
  try:
    assert not stop.requested(0)
    os.kill(os.getpid(), sig)
    assert stop.requested(1) and stop.signal == sig.name
    assert {s: signal.getsignal(s) for s in previous} == previous  # a second signal acts at once
  finally:
    stop.uninstall()


def test_bad_step_guard_counts_consecutive_non_finite_steps(tmp_path):
  guard = loop.BadStepGuard(max_bad_steps=3)
  flags = {1: True, 2: False, 3: False, 4: True, 5: False, 6: False}
  for step, ok in flags.items():
    guard.observe(step, jnp.asarray(ok))
  assert guard.streak == 2 and not guard.tripped
  guard.observe(6, jnp.asarray(True))  # a step is counted once, whoever reads it again
  assert guard.streak == 2
  assert not guard.finite_at(7, jnp.asarray(False)) and guard.tripped
  msg = str(guard.error(4, tmp_path))
  assert "3 consecutive steps (5-7)" in msg and "train.max_bad_steps=3" in msg and "last good checkpoint is step 4" in msg
