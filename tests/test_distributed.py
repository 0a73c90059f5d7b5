"""When and how processes join a job: explicit flags, `srun` detection, and bad flags.

`jax.distributed.initialize` is replaced by a recorder here; the real thing runs in
tests/test_sharding.py (two processes over gloo on 127.0.0.1).
"""

from __future__ import annotations

import jax
import pytest

from ar_lm_jax import distributed
from ar_lm_jax.config import ConfigError

SRUN_2_TASKS = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize and jax.config.update calls instead of making them."""
  got = {"initialize": [], "config": []}
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: got["initialize"].append(kw))
  monkeypatch.setattr(jax.config, "update", lambda name, value: got["config"].append((name, value)))
  for var in SRUN_2_TASKS:
    monkeypatch.delenv(var, raising=False)
  return got


def test_single_process_joins_nothing(calls):
  assert distributed.initialize() is False
  assert calls == {"initialize": [], "config": []}


def test_explicit_flags_are_passed_through_with_gloo_for_cpu(calls):
  assert distributed.initialize("127.0.0.1:1234", 2, 1) is True
  assert calls["config"] == [("jax_cpu_collectives_implementation", "gloo")]
  assert calls["initialize"] == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
                                  "initialization_timeout": 300}]


def test_srun_step_is_detected_and_left_to_jax(calls, monkeypatch):
  for k, v in SRUN_2_TASKS.items():
    monkeypatch.setenv(k, v)
  assert distributed.under_srun()
  assert distributed.initialize() is True
  # JAX's SLURM cluster reads the coordinator, process count and id from the environment itself.
  assert calls["initialize"] == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                                  "initialization_timeout": 300}]


def test_cloud_tpu_vm_is_detected_and_left_to_jax(calls, monkeypatch):
  from jax._src import cloud_tpu_init
  assert distributed.on_cloud_tpu_vm() is False  # this CPU host
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)  # what `import jax` sets on a TPU VM
  assert distributed.initialize() is True
  # JAX's Cloud TPU cluster reads the workers and this host's index from the GCE metadata itself.
  assert calls["initialize"] == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                                  "initialization_timeout": 300}]


@pytest.mark.parametrize("drop,ntasks", [("SLURM_STEP_NODELIST", "16"), (None, "1")])
def test_salloc_shell_and_single_task_steps_are_not_joined(calls, monkeypatch, drop, ntasks):
  # A shell inside `salloc -n 16` has the job's variables but no step: joining would wait forever.
  for k, v in {**SRUN_2_TASKS, "SLURM_NTASKS": ntasks}.items():
    if k != drop:
      monkeypatch.setenv(k, v)
  assert not distributed.under_srun()
  assert distributed.initialize() is False and calls["initialize"] == []


@pytest.mark.parametrize("args,message", [
    ((None, 2, None), "must be given together"),
    (("host:1", 2, 2), "--process_id=2 is not in"),
    (("host:1", 0, 0), "is not in"),
    (("host", 2, 0), "must be HOST:PORT"),
])
def test_bad_flags_are_config_errors_before_anything_starts(calls, args, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize(*args)
  assert calls == {"initialize": [], "config": []}
