"""Shared by the tests that compare whole runs (test_loop.py, test_faults.py): what a workdir logged and saved;
and the two-process launcher of the tests that need real processes over gloo (test_checkpoint.py, test_harness.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import portpicker
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def metrics(workdir) -> dict[int, dict]:
  """step -> the last train row logged for it (a step re-run after a crash or a fallback is logged again)."""
  path = Path(workdir) / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
  return {r["step"]: r for r in rows if "loss" in r}


def steps_saved(workdir) -> list[int]:
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_steps(got, want, steps):
  """Bitwise: the loss, gradient norm, learning rate and global batch of every step in `steps`."""
  for s in steps:
    for key in ("loss", "grad_norm", "lr", "data/batch_hash"):
      assert got[s][key] == want[s][key], f"step {s} {key}: {got[s][key]!r} != {want[s][key]!r}"


def run_two_processes(argv: Callable[[int, str], list[str]], timeout_s: float = 300) -> list[tuple[int, str, str]]:
  """(exit code, stdout, stderr) of processes 0 and 1 of `python ARGV(i, "127.0.0.1:PORT")`, one CPU device each,
  run from the repo root; never waits longer than `timeout_s`: on a hang both are killed and the test fails."""
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(REPO_ROOT)}
  procs = [subprocess.Popen([sys.executable, *argv(i, address)], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout_s)
      out.append((p.returncode, stdout, stderr))
  except subprocess.TimeoutExpired:
    pytest.fail(f"a process of the two still ran after {timeout_s} s: {[p.args[1:3] for p in procs]}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out
