"""Faults in a 2-process run: real processes over gloo on 127.0.0.1, each outcome asserted in bounded time.

Every run is `python -m experiments.train` twice (process 0 and 1, one CPU device each, mesh.data=2).
One run goes through the faults in turn, each rerun the same command, and ends compared with one
uninterrupted 2-process run of 12 steps, loss by loss and batch by batch:
- SIGTERM to process 1 alone: process 0 notices within checkpoint.stop_check_every steps, says which
  process was signalled, both save and exit 0;
- SIGKILL of process 1: process 0 exits 1 with one line (the lost process, the step, the last complete
  checkpoint) within checkpoint.peer_timeout_s and a margin, never hangs;
- the rerun resumes from that checkpoint; SIGTERM to both: both save and exit 0;
- process 1's data-state file of the latest step damaged: both processes agree that the step is
  unusable, move it aside together (one warning line), fall back to the previous step, and the run
  ends bitwise like the uninterrupted one (before, process 1 left the restore barrier alone and
  process 0 hung).
The runs share a JAX compilation cache. A slowed data iterator (DELAY_S per batch) lets signals land mid-run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import portpicker
import pytest
from run_testing import assert_same_steps, metrics, steps_saved

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config=tiny", "--config.model.num_heads=2", "--config.model.hidden_size=16", "--config.data.seq_len=32",
        "--config.data.batch_size=4", "--config.train.steps=12", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.progress=false", "--config.mesh.data=2",
        "--config.checkpoint.every_steps=2", "--config.checkpoint.stop_check_every=2",
        "--config.checkpoint.peer_timeout_s=5"]
TIMEOUT_S = 300  # a run that has not ended by then hangs: both processes are killed and the test fails

# experiments.train with every batch DELAY_S late, so that a signal or a kill lands in the middle of the run.
SLOW_DRIVER = r"""
import os, runpy, sys, time
from ar_lm_jax import data
make = data.make_train_iterator
DELAY_S = float(os.environ.get("DELAY_S", "0"))

class Slow:
  def __init__(self, it):
    self.it = it
  def __iter__(self):
    return self
  def __next__(self):
    time.sleep(DELAY_S)
    return next(self.it)
  def __getattr__(self, name):
    return getattr(self.it, name)

data.make_train_iterator = lambda *a, **k: Slow(make(*a, **k))
sys.argv = ["experiments.train"] + sys.argv[1:]
runpy.run_module("experiments.train", run_name="__main__")
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


class Pair:
  """Processes 0 and 1 of one run, each in its own session (so that a hung one dies with its helpers)."""

  def __init__(self, env, workdir: Path, *extra: str, delay_s: float = 0.0):
    self.workdir = workdir
    port = portpicker.pick_unused_port()
    self.procs = []
    for i in range(2):
      cmd = [sys.executable, "-c", SLOW_DRIVER, *ARGS, f"--workdir={workdir}", *extra,
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
      self.procs.append(subprocess.Popen(cmd, env={**env, "DELAY_S": str(delay_s)}, cwd=REPO, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, start_new_session=True))

  def wait_for_steps(self, n: int) -> int:
    t0 = time.monotonic()
    while len(metrics(self.workdir)) < n:
      if any(p.poll() is not None for p in self.procs) or time.monotonic() - t0 > TIMEOUT_S:
        self.kill()
        pytest.fail(f"the run ended or stalled before logging {n} steps:\n{self.outputs()}")
      time.sleep(0.02)
    return len(metrics(self.workdir))

  def finish(self, timeout_s: float = TIMEOUT_S) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, once both ended; fails the test (after killing both) on a hang."""
    out = []
    deadline = time.monotonic() + timeout_s
    for p in self.procs:
      try:
        so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"still running {timeout_s:.0f}s later: a hang")
      out.append((p.returncode, so, se))
    return out

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  def outputs(self) -> str:
    return "\n".join(f"--- process {i}\n{p.stderr.read()[-2000:] if p.stderr and p.poll() is not None else ''}"
                     for i, p in enumerate(self.procs))


def assert_ok(results):
  for i, (rc, so, se) in enumerate(results):
    assert rc == 0, f"process {i} exited {rc}\n{so[-2000:]}\n{se[-3000:]}"


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """The metrics of the uninterrupted 2-process run."""
  workdir = tmp_path_factory.mktemp("reference")
  assert_ok(Pair(env, workdir).finish())
  m = metrics(workdir)
  assert sorted(m) == list(range(1, 13)) and steps_saved(workdir) == [10, 12]
  return m


def test_sigterm_sigkill_and_a_damaged_data_state_in_one_run_that_ends_bitwise(env, reference, tmp_path):
  # One run taken through the four faults in turn (each rerun is the same command), so that the whole
  # sequence costs five 2-process launches with the reference.

  # 1. SIGTERM to process 1 alone: both stop at the next agreement step (every 2), save, and exit 0;
  #    process 0 (the one that prints) names the signalled process.
  run = Pair(env, tmp_path, delay_s=0.4)
  seen = run.wait_for_steps(1)
  run.procs[1].send_signal(signal.SIGTERM)
  t0 = time.monotonic()
  results = run.finish()
  assert_ok(results)
  assert time.monotonic() - t0 < 60
  said = re.search(r"SIGTERM on process 1 of 2: stopped at step (\d+) with a checkpoint in .*; "
                   r"run the same command again to continue", results[0][1])
  assert said, results[0][1][-2000:]
  stopped = int(said.group(1))
  # The step in flight when the signal came is at most seen + 1; the processes agree every 2 steps.
  assert stopped % 2 == 0 and stopped <= seen + 1 + 2 and steps_saved(tmp_path)[-1] == stopped
  summary = json.loads(results[0][1].strip().splitlines()[-1])
  assert summary["stop_signal"] == "SIGTERM" and summary["stop_signal_processes"] == [1]

  # 2. SIGKILL of process 1: process 0 exits 1 with one line within checkpoint.peer_timeout_s=5 and a margin
  #    for a loaded machine (JAX alone took about 100 s and aborted with a C++ stack trace).
  run = Pair(env, tmp_path, delay_s=0.4)
  run.wait_for_steps(stopped + 2)
  run.procs[1].kill()
  t0 = time.monotonic()
  (rc, out, err), _ = run.finish()
  took = time.monotonic() - t0
  lines = err.strip().splitlines()
  assert rc == 1 and len(lines) == 1, err[-3000:]
  said = re.fullmatch(r"error: process 1 of 2 stopped responding at step (\d+); the last complete checkpoint is "
                      r"step (\d+); run the same command again to resume from it", lines[0])
  assert said and took < 60, (lines[0], took)
  last = int(said.group(2))
  assert last == steps_saved(tmp_path)[-1] and last >= stopped and int(said.group(1)) >= stopped + 2

  # 3. The rerun resumes from that checkpoint; SIGTERM to both (agreeing every step): both save and exit 0.
  run = Pair(env, tmp_path, "--config.checkpoint.stop_check_every=1", delay_s=0.4)
  run.wait_for_steps(last + 1)
  for p in run.procs:
    p.send_signal(signal.SIGTERM)
  results = run.finish()
  assert_ok(results)
  assert f"resuming from checkpoint step {last} in" in results[0][1]
  said = re.search(r"SIGTERM on process ([01, ]+) of 2: stopped at step (\d+)", results[0][1])
  assert said and said.group(1) in ("0, 1", "0", "1"), results[0][1][-2000:]  # one, if an agreement fell between
  both = int(said.group(2))
  assert both > last and steps_saved(tmp_path)[-1] == both and len(steps_saved(tmp_path)) == 2

  # 4. Process 1's data-state file of that step damaged: both agree it is unusable, move it aside together with
  #    one warning line, fall back to the previous checkpoint, and the run ends like the uninterrupted one.
  previous = steps_saved(tmp_path)[0]
  (tmp_path / "checkpoints" / str(both) / "data" / "process_1-of-2.json").write_text('{"truncated')
  results = Pair(env, tmp_path).finish()
  assert_ok(results)
  out0, err0 = results[0][1], results[0][2]
  warnings = [line for line in err0.splitlines() if line.startswith("warning:") and f"step {both} " in line]
  assert len(warnings) == 1 and "Traceback" not in err0, err0[-3000:]
  # Every process reads every process's data state (the data order is global), so both see the same
  # damage and it is said once, naming the file.
  assert re.fullmatch(rf"warning: checkpoint step {both} is unusable: cannot read "
                      r"data/process_1-of-2\.json \(JSONDecodeError: .*\); moved it to \d+\.corrupt-[\d-]+; "
                      r"trying the previous one", warnings[0]), warnings[0]
  assert f"resuming from checkpoint step {previous} in" in out0
  assert len(list((tmp_path / "checkpoints").glob(f"{both}.corrupt-*"))) == 1
  assert_same_steps(metrics(tmp_path), reference, range(1, 13))
