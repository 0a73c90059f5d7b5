"""The train step compiled by XLA:TPU for real Cloud TPU slices, on this CPU host: runs only where libtpu is installed.

`pip install -r requirements-tpu.txt` in a separate venv (docs/tpu.md), then
`venv-tpu/bin/python -m pytest tests/test_tpu_compile.py`. Elsewhere every test here is
skipped: the CPU suite never needs libtpu. `.ci/run` runs this file in such a venv.
`AR_LM_SLOW_TESTS=1` adds the full recipe with splash on v5litepod-16 with and without FSDP
(two compiles of several minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ar_lm_jax import flops, tpu_topology

pytestmark = pytest.mark.skipif(not tpu_topology.libtpu_installed(), reason="libtpu is not installed (requirements-tpu.txt)")

REPO = Path(__file__).resolve().parents[1]
ISSUE_SLICES = ("v4-8", "v5p-8", "v5p-16", "v5litepod-8", "v5litepod-16", "v6e-8", "v6e-16")


def dry_run(*flags: str, timeout: int = 600) -> tuple[int, str, str]:
  """`experiments.train --dry_run` in the TPU environment: (exit code, stdout, stderr)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS", "XLA_FLAGS"))}
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--dry_run", *flags], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def slice_devices():
  """{slice name: libtpu's compile-only devices}, in a subprocess so this pytest's jax stays on CPU."""
  code = ("import json; from ar_lm_jax import tpu_topology as t; t.prepare_environment(t.lookup('v4-8'));"
          f"print(json.dumps({{n: [[d.device_kind, d.process_index] for d in t.devices(t.lookup(n))] for n in {ISSUE_SLICES!r}}}))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ISSUE_SLICES)
def test_slice_table_matches_libtpu(name, slice_devices):
  s = tpu_topology.lookup(name)
  devs = slice_devices[name]
  assert len(devs) == s.chips  # one JAX device per chip (v4/v5p in megacore mode)
  assert {kind for kind, _ in devs} == {s.chip.device_kind}
  assert len({proc for _, proc in devs}) == s.hosts
  assert flops.peak_flops_for_kind(s.chip.device_kind) == s.chip.peak_bf16_flops


def test_recommended_libtpu_flags_parse_and_two_dry_runs_share_a_host():
  """libtpu aborts on an unknown LIBTPU_INIT_ARGS flag; and a second libtpu process on one host would hit its lock file."""
  code = ("from ar_lm_jax import tpu_topology as t; s = t.lookup('v5litepod-8'); t.prepare_environment(s);"
          "print(t.compiler_hbm_bytes(t.devices(s)[0]))")
  env = {**os.environ, "LIBTPU_INIT_ARGS": " ".join(tpu_topology.RECOMMENDED_LIBTPU_INIT_ARGS)}
  first = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  second = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  out, err = first.communicate(timeout=300)
  for proc_out, proc_err, rc in ((out, err, first.returncode), (second.stdout, second.stderr, second.returncode)):
    assert rc == 0, proc_err[-3000:]
    assert 15 * 2**30 < int(proc_out.strip()) < 16 * 2**30
  bad = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LIBTPU_INIT_ARGS": "--xla_tpu_no_such_flag=true"})
  assert bad.returncode != 0 and "Unknown command line flag 'xla_tpu_no_such_flag'" in bad.stderr + bad.stdout


def test_tiny_compiles_for_v5litepod_8_and_xla_counts_our_shards():
  code, out, err = dry_run("--config=tiny", "--target=v5litepod-8", "--config.mesh.data=-1")
  assert code == 0, err[-3000:]
  assert err == ""  # libtpu's start-up logs nothing once prepare_environment named the slice
  report = json.loads(out.strip().splitlines()[-1])
  assert (report["target"], report["platform"], report["devices"], report["hosts"]) == ("v5litepod-8", "tpu", 8, 1)
  assert report["mesh"] == {"data": 8, "model": 1} and report["fits"] is True
  # The compiler's own usable HBM of a v5e chip: a little under the data sheet's 16 GiB.
  assert report["hbm_source"] == "XLA:TPU compiler"
  assert 15 * 2**30 < report["hbm_bytes_per_device"] < 16 * 2**30
  # XLA:TPU's count of the step's inputs holds our shards: the state (two int32 scalars included) and this
  # chip's 1 row of tokens, segment ids and positions. TPU lays arrays out in (8, 128) tiles, so small
  # dims are padded (tiny's 2-layer [L, D] biases, the 1-row batch, scalars): 0.85% more here, 0.015%
  # for the full recipe, where CPU (no tiling) agrees to the byte (tests/test_dry_run.py).
  mem = report["memory"]
  state = report["param_bytes_per_device"] + report["opt_state_bytes_per_device"] + 8
  assert state + 1 * 128 * 3 * 4 <= mem["argument"] < 1.01 * (state + 1 * 128 * 3 * 4)
  assert state <= mem["alias"] < 1.01 * state  # the state is donated
  # The verdict's peak is the compiler's own peak of live bytes; the plain sum of arguments and temp_size
  # is kept beside it (on the FSDP recipe XLA:TPU's temp_size overstates the peak by 4.6 GiB: docs/tpu.md).
  assert report["peak_bytes_per_device"] == mem["compiler_peak"] > 0
  assert mem["sum_estimate"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  assert report["compile_s"] == {"train": mem["compile_s"], "eval": report["eval_memory"]["compile_s"]}
  eval_args = report["param_bytes_per_device"] + 1 * 128 * 3 * 4  # params + batch
  assert eval_args <= report["eval_memory"]["argument"] < 1.01 * eval_args
  # tiny's attention is auto: splash on TPU. Mosaic lowers it only for a TPU, so this compile is its real check:
  # the forward kernel and the two backward kernels (dq, dk/dv), once each in the scanned layer's body.
  assert report["attention"] == "splash" and report["mosaic_kernels_in_train_step"] == 3
  assert "train step compiled in" in out and "the train and eval steps fit on v5litepod-8" in out


def test_a_step_that_does_not_fit_exits_1_with_one_line():
  # The reference attention's fp32 [B, N, T, T] scores alone are 64 x 4 x 4096^2 x 4 bytes = 16 GiB per layer on
  # the one chip: more than a v5e chip's 15.75 GiB, for the train and the eval step (both refused in seconds).
  b, n, t = 64, 4, 4096
  code, out, err = dry_run("--config=tiny", "--target=v5litepod-1", "--config.model.attention=xla",
                           f"--config.model.max_position_embeddings={t}", f"--config.data.batch_size={b}",
                           f"--config.data.seq_len={t}")
  assert code == 1, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("does not fit: peak ") and lines[0].endswith(
      " GiB per chip on v5litepod-1"), err
  report = json.loads(out.strip().splitlines()[-1])
  assert report["fits"] is False and report["memory"]["out_of_memory"] is True
  assert report["peak_bytes_per_device"] > report["hbm_bytes_per_device"]
  assert report["peak_bytes_per_device"] >= b * n * t * t * 4  # at least one layer's scores
  assert f"peak {report['peak_bytes_per_device'] / 2**30:.2f} GiB > HBM {report['hbm_bytes_per_device'] / 2**30:.2f} GiB" in lines[0]


def test_auto_attention_that_splash_cannot_tile_exits_2():
  code, out, err = dry_run("--config=tiny", "--target=v5litepod-8", "--config.data.seq_len=96")
  assert code == 2 and out == ""
  assert err.strip() == ("error: model.splash_block_q: 96 (shrunk to data.seq_len=96) must divide data.seq_len "
                         "and be a multiple of 128")


def test_a_mesh_that_does_not_match_the_slice_exits_2():
  code, out, err = dry_run("--config=tiny", "--target=v5litepod-8", "--config.mesh.data=16")
  assert code == 2 and out == ""
  assert err.strip() == "error: mesh: data=16 x model=1 = 16 does not match the 8 devices (mesh.data=-1 takes the devices mesh.model leaves)"


RECIPE_ON_V5E_16 = ("--config=ar_stablelm_2_1_6b", "--target=v5litepod-16", "--config.mesh.data=-1")


def test_recipe_batch_on_v5litepod_16_without_fsdp_does_not_fit():
  """The card's 96 x 4096 batch on 16 v5e chips, parameters replicated: the case the dry run exists for.

  With the reference attention both steps are refused within seconds; with splash (the recipe's
  `auto` on TPU) the train step is refused too (18.5 GiB) but the eval step compiles, for minutes.
  """
  code, out, err = dry_run(*RECIPE_ON_V5E_16, "--config.mesh.fsdp=false", "--config.model.attention=xla")
  assert code == 1, err[-3000:]
  report = json.loads(out.strip().splitlines()[-1])
  assert err.strip().splitlines() == [f"does not fit: peak {report['peak_bytes_per_device'] / 2**30:.2f} GiB > "
                                      "HBM 15.75 GiB per chip on v5litepod-16"]
  assert report["mesh"] == {"data": 16, "model": 1} and report["fits"] is False
  assert report["memory"]["out_of_memory"] and report["eval_memory"]["out_of_memory"]
  # fp32 parameters and their gradients alone are 13.2 GB on every chip, 78% of its HBM, before any activation.
  assert report["param_bytes_per_device"] == 4 * 1_644_515_328
  assert 2 * report["param_bytes_per_device"] > 0.75 * report["hbm_bytes_per_device"]
  assert report["peak_bytes_per_device"] > report["hbm_bytes_per_device"]


@pytest.mark.skipif(not os.environ.get("AR_LM_SLOW_TESTS"), reason="compiles the full recipe with splash for 16 chips (minutes)")
def test_fsdp_makes_the_recipe_fit_on_v5litepod_16():
  _, out, _ = dry_run(*RECIPE_ON_V5E_16, "--config.mesh.fsdp=false", timeout=1800)
  replicated = json.loads(out.strip().splitlines()[-1])
  code, out, err = dry_run(*RECIPE_ON_V5E_16, "--config.mesh.fsdp=true", timeout=1800)
  sharded = json.loads(out.strip().splitlines()[-1])
  assert replicated["attention"] == sharded["attention"] == "splash"
  # FSDP splits every matrix 16 ways over `embed`; the LayerNorm weights and biases and the q/k/v biases
  # (no `embed` axis, 0.02% of the parameters) stay whole on every chip.
  L, D = 24, 2048
  whole = 4 * (L * 2 * 2 * D + 2 * D + L * 3 * D)
  assert sharded["param_bytes_per_device"] == (replicated["param_bytes_per_device"] - whole) // 16 + whole
  # libtpu 0.0.42: replicated, XLA:TPU refuses the step (18.51 GiB: 6.90 of inputs + 11.61 of temporaries,
  # 6.13 of them the fp32 gradients); with FSDP it compiles with a peak of 11.05 GiB per chip.
  assert replicated["memory"]["out_of_memory"] and replicated["fits"] is False
  assert code == 0, err[-3000:]
  assert sharded["fits"] is True and sharded["peak_bytes_per_device"] < 0.75 * sharded["hbm_bytes_per_device"]
  assert sharded["peak_bytes_per_device"] < replicated["peak_bytes_per_device"] - 6 * 2**30
  # What the verdict used to add up, arguments + temp_size (16.17 GiB), exceeds HBM: temp_size is not a peak.
  assert sharded["memory"]["sum_estimate"] > sharded["hbm_bytes_per_device"]
  for r in (replicated, sharded):  # the forward-only eval step fits either way
    assert r["eval_peak_bytes_per_device"] < r["hbm_bytes_per_device"]
