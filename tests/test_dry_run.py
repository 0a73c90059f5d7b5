"""`--dry_run`: the full recipe checked on 16 fake CPU devices without allocating it, and bad launches exiting 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ar_lm_jax import dry_run
from ar_lm_jax.cli import CONFIGS_DIR
from ar_lm_jax.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE_PARAMS = 1_644_515_328  # HF StableLmForCausalLM with the 1.6B config (REFERENCE.md)


def env_with_devices(n: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}


def test_recipe_dry_run_on_16_devices(tmp_path):
  out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
  with open(out_path, "w") as out, open(err_path, "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--config=ar_stablelm_2_1_6b", "--dry_run"],
                            env=env_with_devices(16), cwd=REPO, stdout=out, stderr=err)
    try:
      _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory and CPU time
    finally:
      if proc.poll() is None:
        proc.kill()
  assert os.waitstatus_to_exitcode(status) == 0, err_path.read_text()[-3000:]
  text = out_path.read_text()
  report = json.loads(text.strip().splitlines()[-1])
  assert report["params"] == RECIPE_PARAMS
  assert report["mesh"] == {"data": 16, "model": 1}
  assert report["param_bytes_per_device"] == 4 * RECIPE_PARAMS  # fp32, replicated over data, model axis of 1
  # ZeRO-1: both AdamW moments split 16 ways (plus two int32 step counters).
  assert report["opt_state_bytes_per_device"] == pytest.approx(2 * 4 * RECIPE_PARAMS / 16, rel=1e-6)
  # XLA's own count of the compiled step's inputs agrees to the byte: our state shards, the two int32
  # scalars of the state, and this device's 6 rows of tokens, segment ids and positions.
  mem = report["memory"]
  batch_bytes = 6 * 4096 * 3 * 4
  assert mem["argument"] == report["param_bytes_per_device"] + report["opt_state_bytes_per_device"] + 8 + batch_bytes
  assert mem["alias"] >= report["param_bytes_per_device"] + report["opt_state_bytes_per_device"]  # the state is donated
  assert 0 < mem["temp"] < 80e9  # the recipe's remat keeps it under an H100's 80 GB even with XLA attention
  # One gradient reduction per step (issue 12): all-reduce + reduce-scatter within 5% of the fp32 gradients.
  coll = report["collective_bytes_per_device"]
  assert set(coll) == {"all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute"}
  assert coll["all-reduce"] + coll["reduce-scatter"] <= 1.05 * 4 * RECIPE_PARAMS
  assert "parameters: 1,644,515,328" in text and "mesh: data=16 x model=1" in text
  # Nothing was allocated: 6.6 GB of parameters would show in the peak RSS (ru_maxrss is in KiB).
  assert usage.ru_maxrss * 1024 < 3e9
  assert usage.ru_utime + usage.ru_stime < 120  # the 2-minute bound, in CPU time so load elsewhere can't flake it


def test_dry_run_without_compiling_allocates_nothing():
  cfg = apply_overrides(load_config("tiny", CONFIGS_DIR), {"mesh.data": "1"})
  before = {id(a) for a in jax.live_arrays()}
  report = dry_run.dry_run(cfg, memory_analysis=False)
  assert [a for a in jax.live_arrays() if id(a) not in before] == []
  assert "memory" not in report and report["mesh"] == {"data": 1, "model": 1}
  assert report["param_bytes_per_device"] == 4 * report["params"]
  assert report["opt_state_bytes_per_device"] == 2 * 4 * report["params"] + 8  # moments + two int32 counters


def test_gpu_only_attention_reports_why_there_is_no_memory_analysis():
  cfg = apply_overrides(load_config("tiny", CONFIGS_DIR), {"mesh.data": "1", "model.attention": "pallas"})
  report = dry_run.dry_run(cfg)
  assert "memory" not in report and report["memory_unavailable"] == "model.attention=pallas compiles only on GPU, not cpu"
  assert report["params"] == 12_946_432  # the shapes-only part still runs


@pytest.mark.parametrize("devices,flags,message", [
    (1, ["--config.mesh.data=3"], "mesh: data=3 x model=1 = 3 does not match the 1 devices"),
    (3, ["--config.mesh.data=1", "--config.mesh.model=3", "--dry_run"], "mesh.model: 3 does not divide model.num_heads=4"),
    (4, ["--config.mesh.data=1", "--config.mesh.model=4", "--config.model.intermediate_size=178"],
     "mesh.model: 4 does not divide model.intermediate_size=178"),
    (3, ["--config.mesh.data=3", "--dry_run"], "does not divide over mesh.data=3"),
    (1, ["--num_processes=2"], "--coordinator_address, --num_processes and --process_id must be given together"),
])
def test_bad_launch_exits_2_with_one_line(devices, flags, message, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}", *flags],
                        env=env_with_devices(devices), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-3000:]
  assert proc.stdout == "" and not (tmp_path / "run").exists()
