"""The global batch is a function of (seed, step, config): the same on 1, 2 or 4 processes, and across a resume
on another process count (in-process iterators), and end to end with 2 real processes resumed by 1 (gloo)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ar_lm_jax import batch as batch_lib
from ar_lm_jax import data
from ar_lm_jax.config import ConfigError, DataConfig, MixtureStage, SourceConfig

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def write_jsonl(path, n, seed):
  rng = np.random.default_rng(seed)
  lines = [json.dumps({"text": f"{path.stem} {i} " + " ".join(rng.choice(WORDS, size=rng.integers(3, 40)))})
           for i in range(n)]
  path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  d = tmp_path_factory.mktemp("order")
  for i in range(4):  # 4 files: dealt out whole to 4 virtual shards
    write_jsonl(d / f"en-{i}.jsonl", 60, seed=i)
  write_jsonl(d / "ar.jsonl", 200, seed=9)  # 1 file: every shard reads it, keeping its records
  return DataConfig(sources=(SourceConfig(str(d / "en-*.jsonl"), "en", 0.3), SourceConfig(str(d / "ar.jsonl"), "ar", 0.7)),
                    stages=(MixtureStage(4, {"en": 0.8, "ar": 0.2}),), seq_len=16, batch_size=8, prefetch=0,
                    shuffle_window=64, virtual_shards=4)


def iterators(cfg, P, seed=3):
  return [data.make_train_iterator(cfg, seed=seed, process_index=p, process_count=P) for p in range(P)]


def global_batches(its, n):
  """n global batches: each process's rows in process order (what make_array_from_process_local_data assembles)."""
  out = []
  for _ in range(n):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in batch_lib.KEYS})
  return out


def close(its):
  for it in its:
    it.close()


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in batch_lib.KEYS:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def reference(cfg):
  """8 global batches of one process, its states after 3 steps, and its stats at steps 3 and 8."""
  (it,) = iterators(cfg, 1)
  first = global_batches([it], 3)
  state, stats_3 = it.get_state(), it.stats()
  rest = global_batches([it], 5)
  stats_8 = it.stats()
  it.close()
  return first + rest, state, stats_3, stats_8


def without_hash(stats):
  return {k: v for k, v in stats.items() if k != "data/batch_hash"}


@pytest.mark.parametrize("P", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(cfg, reference, P):
  batches, _, _, stats_8 = reference
  its = iterators(cfg, P)
  got = global_batches(its, 8)
  close(its)
  assert_same(got, batches)
  assert len({b["tokens"].tobytes() for b in got}) == 8  # not a constant
  # The batch hash of the global rows is the one the single process reports.
  assert data.combine_row_hashes(data.row_hashes(got[-1])) == stats_8["data/batch_hash"]
  # Both languages in every step (the mixture is decided per global row, not per process).
  assert stats_8["data/tokens_en"] and stats_8["data/tokens_ar"]


@pytest.mark.parametrize("before,after", [(2, 1), (2, 4), (1, 2), (4, 2)])
def test_resume_on_another_process_count_continues_the_same_batches(cfg, reference, before, after):
  batches, _, stats_3, stats_8 = reference
  its = iterators(cfg, before)
  assert_same(global_batches(its, 3), batches[:3])
  saved = json.loads(json.dumps([it.get_state() for it in its]))  # what the checkpoint holds, one per process
  close(its)
  again = iterators(cfg, after)
  for it in again:
    it.set_state(saved)
  assert_same(global_batches(again, 5), batches[3:])
  if after == 1:
    # Counters are kept per virtual shard, so they continue whatever the process count.
    assert without_hash(again[0].stats()) == without_hash(stats_8)
  close(again)


def test_counters_survive_a_process_count_change(cfg, reference):
  _, _, stats_3, _ = reference
  its = iterators(cfg, 2)
  global_batches(its, 3)
  saved = [it.get_state() for it in its]
  close(its)
  (one,) = iterators(cfg, 1)
  one.set_state(saved)
  assert without_hash(one.stats()) == without_hash(stats_3)
  one.close()


def test_changed_files_are_refused_naming_the_source(cfg, reference, tmp_path):
  _, state, _, _ = reference
  d = Path(cfg.sources[0].path).parent
  extra = d / "en-4.jsonl"
  write_jsonl(extra, 10, seed=4)  # a shard appeared between restarts: the glob now resolves to 5 files
  try:
    (it,) = iterators(cfg, 1)
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(lang=en.*files are not those .*then 4 files.*now 5 files"):
      it.set_state(state)
    it.close()
  finally:
    extra.unlink()


def test_virtual_shards_must_split_over_processes_and_match_the_checkpoint(cfg, reference):
  _, state, _, _ = reference
  with pytest.raises(ConfigError, match=r"data.virtual_shards: the data order's 4 virtual shards do not split over 3"):
    data.make_train_iterator(cfg, seed=3, process_index=0, process_count=3)
  (it,) = iterators(dataclasses.replace(cfg, virtual_shards=8), 1)
  with pytest.raises(ConfigError, match=r"data.virtual_shards: .* from 4 virtual shards, this run's config gives 8"):
    it.set_state(state)
  it.close()
  with pytest.raises(ConfigError, match="does not divide data.batch_size"):
    dataclasses.replace(cfg, virtual_shards=3)
  # A state of the data pipeline before virtual shards (per-process streams) cannot continue this order.
  (it,) = iterators(cfg, 1)
  with pytest.raises(ConfigError, match="older data pipeline"):
    it.set_state({"pipeline": {}, "step": 3, "tokens": [0, 0], "padding": 0, "skipped": {}})
  it.close()


# ---------------------------------------------------------------------------
# End to end: the acceptance check, with real processes.

TINY = ["--config=tiny", "--config.train.steps=8", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.progress=false", "--config.mesh.data=4"]


def env_with_devices(n: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": str(REPO)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(args, devices, log):
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], env=env_with_devices(devices), cwd=REPO,
                            stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_all(procs, timeout_s=420):
  try:
    for proc, log in procs:
      rc = proc.wait(timeout=timeout_s)
      assert rc == 0, f"{log.name} exited {rc}:\n{log.read_text()[-3000:]}"
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()


def metrics(workdir):
  return {m["step"]: m for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_two_processes_then_one_match_one_process(tmp_path):
  """1 process x 4 devices for 8 steps == 2 processes x 2 devices for 4 steps, resumed by 1 process x 4 devices."""
  one, two = tmp_path / "one", tmp_path / "two"
  cluster = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
  procs = [(start([f"--workdir={one}", *TINY], 4, tmp_path / "one.log"), tmp_path / "one.log")]
  procs += [(start([f"--workdir={two}", *TINY, "--config.train.stop_after=4", *cluster, f"--process_id={i}"], 2,
                   tmp_path / f"two-{i}.log"), tmp_path / f"two-{i}.log") for i in range(2)]
  wait_all(procs)
  assert sorted(metrics(two)) == [1, 2, 3, 4]
  wait_all([(start([f"--workdir={two}", *TINY], 4, tmp_path / "resume.log"), tmp_path / "resume.log")])
  assert "resuming from checkpoint step 4" in (tmp_path / "resume.log").read_text()
  a, b = metrics(one), metrics(two)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  assert len({a[s]["data/batch_hash"] for s in a}) == 8
  for s in a:
    assert a[s]["data/batch_hash"] == b[s]["data/batch_hash"], s
    assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 * abs(a[s]["loss"]), (s, a[s]["loss"], b[s]["loss"])
    assert a[s]["data/tokens_en"] == b[s]["data/tokens_en"] and a[s]["data/epochs_1_ar"] == b[s]["data/epochs_1_ar"]
  assert a[8]["loss"] < a[1]["loss"]
