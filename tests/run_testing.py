"""Shared by the tests that compare whole runs (test_loop.py, test_faults.py): what a workdir logged and saved."""

import json
from pathlib import Path


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
