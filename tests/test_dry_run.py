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
from ar_lm_jax.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE_PARAMS = 1_644_515_328  # HF StableLmForCausalLM with the 1.6B config (REFERENCE.md)


def env_with_devices(n: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}


# Runs argv[2:] and writes its exit code, peak RSS and CPU time to argv[1]. A child forked from the
# pytest process would report that process's RSS (GBs: the tests run in-process) as its own peak,
# because Linux carries the RSS a child was forked with into ru_maxrss across exec; forked from this
# small launcher, the peak is the command's own.
_MEASURE = r"""
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
  json.dump({"exit": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
             "cpu_s": usage.ru_utime + usage.ru_stime}, f)
"""


def test_recipe_dry_run_on_16_devices(tmp_path):
  out_path, err_path, usage_path = tmp_path / "stdout", tmp_path / "stderr", tmp_path / "usage.json"
  with open(out_path, "w") as out, open(err_path, "w") as err:
    subprocess.run([sys.executable, "-c", _MEASURE, str(usage_path), sys.executable, "-m", "experiments.train",
                    "--config=ar_stablelm_2_1_6b", "--dry_run"], env=env_with_devices(16), cwd=REPO, stdout=out,
                   stderr=err, timeout=600, check=True)
  usage = json.loads(usage_path.read_text())
  assert usage["exit"] == 0, err_path.read_text()[-3000:]
  text = out_path.read_text()
  report = json.loads(text.strip().splitlines()[-1])
  assert report["params"] == RECIPE_PARAMS
  assert report["mesh"] == {"data": 16, "model": 1}
  assert report["param_bytes_per_device"] == 4 * RECIPE_PARAMS  # fp32, replicated over data, model axis of 1
  # ZeRO-1: both AdamW moments split 16 ways (plus two int32 step counters).
  assert report["opt_state_bytes_per_device"] == pytest.approx(2 * 4 * RECIPE_PARAMS / 16, rel=1e-6)
  # XLA's own count of the compiled step's inputs agrees to the byte: our state shards, the two int32
  # scalars of the state, and this device's 6 rows of tokens, segment ids, positions and loss mask.
  mem = report["memory"]
  batch_bytes = 6 * 4096 * 4 * 4
  assert mem["argument"] == report["param_bytes_per_device"] + report["opt_state_bytes_per_device"] + 8 + batch_bytes
  assert mem["alias"] >= report["param_bytes_per_device"] + report["opt_state_bytes_per_device"]  # the state is donated
  assert 0 < mem["temp"] < 80e9  # the recipe's remat keeps it under an H100's 80 GB even with XLA attention
  # One gradient reduction per step (issue 12): all-reduce + reduce-scatter within 5% of the fp32 gradients.
  coll = report["collective_bytes_per_device"]
  assert set(coll) == {"all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute"}
  assert coll["all-reduce"] + coll["reduce-scatter"] <= 1.05 * 4 * RECIPE_PARAMS
  assert "parameters: 1,644,515,328" in text and "mesh: data=16 x model=1" in text
  # Nothing was allocated: 6.6 GB of parameters would show in the peak RSS (ru_maxrss is in KiB).
  assert usage["maxrss_kb"] * 1024 < 3e9
  assert usage["cpu_s"] < 120  # the 2-minute bound, in CPU time so load elsewhere can't flake it


@pytest.mark.devices(1)  # mesh.data=1: a one-device process (conftest.py gives the tests 8)
def test_dry_run_without_compiling_allocates_nothing():
  cfg = apply_overrides(load_config("tiny"), {"mesh.data": "1"})
  before = {id(a) for a in jax.live_arrays()}
  report = dry_run.dry_run(cfg, memory_analysis=False)
  assert [a for a in jax.live_arrays() if id(a) not in before] == []
  assert "memory" not in report and report["mesh"] == {"data": 1, "model": 1}
  assert report["param_bytes_per_device"] == 4 * report["params"]
  assert report["opt_state_bytes_per_device"] == 2 * 4 * report["params"] + 8  # moments + two int32 counters


@pytest.mark.devices(1)  # mesh.data=1: a one-device process (conftest.py gives the tests 8)
def test_gpu_only_attention_reports_why_there_is_no_memory_analysis():
  cfg = apply_overrides(load_config("tiny"), {"mesh.data": "1", "model.attention": "pallas"})
  report = dry_run.dry_run(cfg)
  assert "memory" not in report and report["memory_unavailable"] == "model.attention=pallas compiles only on GPU, not cpu"
  assert report["params"] == 12_946_432  # the shapes-only part still runs


@pytest.mark.parametrize("devices,flags,message", [
    (1, ["--config.mesh.data=3"], "mesh: data=3 x model=1 needs 3 devices, but this launch joined 1 process(es)"),
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


# ---------------------------------------------------------------------------
# --target: the parts that need no libtpu (tests/test_tpu_compile.py compiles for real slices).


def run_train_main(monkeypatch, capsys, argv):
  """experiments.train's main in-process, through cli.run_main: (exit code, stdout, stderr)."""
  from experiments import train as train_entry
  monkeypatch.setattr(sys, "argv", ["train", *argv])
  with pytest.raises(SystemExit) as exit_info:
    from ar_lm_jax import cli
    cli.run_main(train_entry.main)
  out, err = capsys.readouterr()
  return exit_info.value.code, out, err


@pytest.mark.parametrize("argv,message", [
    (["--dry_run", "--target=v5p-15"], "--target: unknown TPU slice 'v5p-15'; known: v4-8,"),
    (["--target=v5p-16"], "--target needs --dry_run"),
])
def test_bad_target_exits_2_with_one_line(argv, message, monkeypatch, capsys):
  code, out, err = run_train_main(monkeypatch, capsys, argv)
  assert code == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_target_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
  from ar_lm_jax import tpu_topology
  monkeypatch.setattr(tpu_topology, "libtpu_installed", lambda: False)
  code, out, err = run_train_main(monkeypatch, capsys, ["--dry_run", "--target=v5litepod-16"])
  assert code == 2 and out == ""
  assert err.strip() == f"error: {tpu_topology.INSTALL_HINT}"
  assert "requirements-tpu.txt" in err


def test_cloud_tpu_names_count_cores_on_v4_v5p_and_chips_on_v5e_v6e():
  from ar_lm_jax import tpu_topology
  expected = {  # name: (chips, hosts, libtpu topology), from the Cloud TPU docs' slice tables
      "v4-8": (4, 1, "v4:2x2x1"), "v5p-8": (4, 1, "v5p:2x2x1"), "v5p-16": (8, 2, "v5p:2x2x2"),
      "v5litepod-8": (8, 1, "v5e:2x4"), "v5litepod-16": (16, 4, "v5e:4x4"), "v6e-8": (8, 1, "v6e:2x4"),
      "v6e-16": (16, 4, "v6e:4x4"), "v5p-128": (64, 16, "v5p:4x4x4"), "v6e-256": (256, 64, "v6e:16x16"),
  }
  got = {n: (s.chips, s.hosts, s.topology_name) for n, s in tpu_topology.SLICES.items() if n in expected}
  assert got == expected
  assert tpu_topology.lookup("v5p-128").wrap == (True, True, True) and tpu_topology.lookup("v5p-64").wrap == (False,) * 3


@pytest.mark.parametrize("message,expected", [
    # XLA:TPU's two out-of-memory forms (libtpu 0.0.42 prints the first); sizes are GiB
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (39.65G) "
     "exceeds available HBM (15.75G).", (int(39.65 * 2**30), int(15.75 * 2**30))),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 512.00M of "
     "15.75G hbm. Exceeded hbm capacity by 1.25G.", (512 * 2**20, int(15.75 * 2**30))),
    ("INTERNAL: Mosaic failed to compile TPU kernel", None),
])
def test_out_of_memory_message_parses_to_bytes(message, expected):
  from ar_lm_jax import tpu_topology
  assert tpu_topology.parse_out_of_memory(message) == expected


@pytest.mark.devices(1)  # mesh.data=1: a one-device process (conftest.py gives the tests 8)
def test_splash_config_builds_and_inits_off_tpu():
  """Init traces a [1, 8] batch, which splash's 128-row tiles cannot cover: building must not call the kernel."""
  from ar_lm_jax import step as step_lib
  cfg = apply_overrides(load_config("tiny"), {"mesh.data": "1", "model.attention": "splash"})
  report = dry_run.dry_run(cfg, memory_analysis=False)
  assert report["params"] == 12_946_432 and report["attention"] == "splash"
  setup = step_lib.build(cfg)
  state = jax.eval_shape(lambda: step_lib.init_state(setup, 0))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state.params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), setup.abstract_state.params)
