"""What happens before a backend starts: the GPU XLA flags, and when and how processes join a job (explicit
flags, `srun` detection in both launch shapes, a Cloud TPU VM, bad flags).

`jax.distributed.initialize` is replaced by a recorder here, and the argument it receives is
replayed through JAX's own SLURM detection (jax/_src/clusters) to get what JAX would then use;
the real thing runs in tests/test_sharding.py and tests/test_faults.py (two processes over gloo).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest
from jax._src import clusters
from slurm_testing import SHAPES, SLURM_GPU_VARS, SRUN_2_TASKS

from ar_lm_jax import distributed, startup
from ar_lm_jax.config import ConfigError


def test_gpu_flags_are_known_to_this_xla_and_added_only_with_a_gpu(monkeypatch):
  env = {**os.environ, "XLA_FLAGS": " ".join(startup.GPU_XLA_FLAGS), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(int(jnp.ones(3).sum()))"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]  # XLA aborts on an unknown flag

  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
  monkeypatch.setattr(startup, "gpu_present", lambda: False)
  assert startup.apply_gpu_xla_flags() == [] and os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
  monkeypatch.setattr(startup, "gpu_present", lambda: True)
  added = startup.apply_gpu_xla_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_gpu_enable_triton_gemm=true" in flags and "--xla_gpu_enable_triton_gemm=false" not in flags  # the user's wins
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and len(added) == len(startup.GPU_XLA_FLAGS) - 1


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize and jax.config.update calls instead of making them (and starts no peer watch)."""
  got = {"initialize": [], "config": []}
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: got["initialize"].append(kw))
  monkeypatch.setattr(jax.config, "update", lambda name, value: got["config"].append((name, value)))
  monkeypatch.setattr(distributed, "PeerWatch", lambda *a: type("NoWatch", (), {"start": lambda self: self})())
  monkeypatch.setattr(distributed, "_client", lambda: None)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  for var in (*SRUN_2_TASKS, *SLURM_GPU_VARS):
    monkeypatch.delenv(var, raising=False)
  return got


def jax_would_use(kw: dict) -> tuple:
  """(coordinator, num_processes, process_id, local_device_ids) after JAX's own cluster detection of what it was given
  (jax/_src/distributed.py: State.initialize, which calls ClusterEnv.auto_detect_unset_distributed_params)."""
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      kw["coordinator_address"], kw["num_processes"], kw["process_id"], kw["local_device_ids"], None,
      kw["initialization_timeout"])


def test_single_process_joins_nothing(calls):
  assert startup.initialize() is False
  assert calls == {"initialize": [], "config": []}


def test_explicit_flags_are_passed_through_with_gloo_for_cpu(calls):
  assert startup.initialize("127.0.0.1:1234", 2, 1) is True
  assert calls["config"] == [("jax_cpu_collectives_implementation", "gloo")]
  assert calls["initialize"] == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
                                  "local_device_ids": None, "initialization_timeout": 300,
                                  "heartbeat_timeout_seconds": 150}]


def test_srun_step_is_detected_and_left_to_jax(calls, monkeypatch):
  for k, v in SRUN_2_TASKS.items():
    monkeypatch.setenv(k, v)
  assert startup.under_srun()
  assert startup.initialize() is True
  # JAX's SLURM cluster reads the coordinator, process count and id from the environment itself.
  assert calls["initialize"] == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                                  "local_device_ids": None, "initialization_timeout": 300,
                                  "heartbeat_timeout_seconds": 150}]
  # No GPUs allocated (a CPU job): JAX's default is left alone.
  assert jax_would_use(calls["initialize"][0]) == ("gpu001:%d" % (4242 % 4096 + 61440), 2, 1, [0])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_srun_gpu_launch_shapes_drive_every_gpu(calls, monkeypatch, shape):
  tasks, gpus, want = SHAPES[shape]
  for k, v in {**SRUN_2_TASKS, **tasks, **gpus}.items():
    monkeypatch.setenv(k, v)
  assert startup.initialize() is True
  (kw,) = calls["initialize"]
  assert kw["local_device_ids"] == want
  coordinator, n, pid, local = jax_would_use(kw)
  assert (coordinator.split(":")[0], n, pid, local) == ("gpu001", int(tasks["SLURM_NTASKS"]),
                                                         int(tasks["SLURM_PROCID"]), want)


def test_jax_local_device_ids_wins_and_uneven_gpu_shares_are_refused(calls, monkeypatch):
  tasks, gpus, _ = SHAPES["two tasks per node"]
  for k, v in {**SRUN_2_TASKS, **tasks, **gpus, "JAX_LOCAL_DEVICE_IDS": "2,3"}.items():
    monkeypatch.setenv(k, v)
  startup.initialize()
  assert calls["initialize"][0]["local_device_ids"] is None  # JAX reads JAX_LOCAL_DEVICE_IDS itself
  monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "3(x2)")
  with pytest.raises(ConfigError, match="3 tasks on this node, which share 8 visible GPUs"):
    startup.initialize()


def test_cloud_tpu_vm_is_detected_and_left_to_jax(calls, monkeypatch):
  from jax._src import cloud_tpu_init
  assert startup.on_cloud_tpu_vm() is False  # this CPU host
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)  # what `import jax` sets on a TPU VM
  assert startup.initialize() is True
  # JAX's Cloud TPU cluster reads the workers and this host's index from the GCE metadata itself.
  assert calls["initialize"] == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                                  "local_device_ids": None, "initialization_timeout": 300,
                                  "heartbeat_timeout_seconds": startup.jax_heartbeat_timeout_s(60)}]


@pytest.mark.parametrize("drop,ntasks", [("SLURM_STEP_NODELIST", "16"), (None, "1")])
def test_salloc_shell_and_single_task_steps_are_not_joined(calls, monkeypatch, drop, ntasks):
  # A shell inside `salloc -n 16` has the job's variables but no step: joining would wait forever.
  for k, v in {**SRUN_2_TASKS, "SLURM_NTASKS": ntasks}.items():
    if k != drop:
      monkeypatch.setenv(k, v)
  assert not startup.under_srun()
  assert startup.initialize() is False and calls["initialize"] == []


@pytest.mark.parametrize("args,message", [
    ((None, 2, None), "must be given together"),
    (("host:1", 2, 2), "--process_id=2 is not in"),
    (("host:1", 0, 0), "is not in"),
    (("host", 2, 0), "must be HOST:PORT"),
])
def test_bad_flags_are_config_errors_before_anything_starts(calls, args, message):
  with pytest.raises(ConfigError, match=message):
    startup.initialize(*args)
  assert calls == {"initialize": [], "config": []}


def test_start_sets_the_flags_before_joining_and_single_process_commands_never_join(calls, monkeypatch):
  order = []
  monkeypatch.setattr(startup, "apply_gpu_xla_flags", lambda: order.append("flags") or [])
  join = startup.initialize
  monkeypatch.setattr(startup, "initialize", lambda *a, **kw: order.append("join") or join(*a, **kw))
  for k, v in SRUN_2_TASKS.items():
    monkeypatch.setenv(k, v)
  # evaluate, generate, the converters and the benchmark run alone even inside an srun step
  assert startup.start(multiprocess=False) is False and order == ["flags"] and calls["initialize"] == []
  order.clear()
  assert startup.start(peer_timeout_s=10) is True and order == ["flags", "join"]
  assert calls["initialize"][0]["heartbeat_timeout_seconds"] == startup.jax_heartbeat_timeout_s(10)
