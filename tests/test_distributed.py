"""When and how processes join a job: explicit flags, `srun` detection in both launch shapes, the
launch check against the mesh, and bad flags.

`jax.distributed.initialize` is replaced by a recorder here, and the argument it receives is
replayed through JAX's own SLURM detection (jax/_src/clusters) to get what JAX would then use;
the real thing runs in tests/test_sharding.py and tests/test_faults.py (two processes over gloo).
"""

from __future__ import annotations

import dataclasses

import jax
import pytest
from jax._src import clusters

from ar_lm_jax import distributed
from ar_lm_jax.config import Config, ConfigError, load_config

SRUN_2_TASKS = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


SLURM_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE",
                  "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID",
                  "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "JAX_LOCAL_DEVICE_IDS")


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
  assert distributed.initialize() is False
  assert calls == {"initialize": [], "config": []}


def test_explicit_flags_are_passed_through_with_gloo_for_cpu(calls):
  assert distributed.initialize("127.0.0.1:1234", 2, 1) is True
  assert calls["config"] == [("jax_cpu_collectives_implementation", "gloo")]
  assert calls["initialize"] == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
                                  "local_device_ids": None, "initialization_timeout": 300,
                                  "heartbeat_timeout_seconds": 150}]


def test_srun_step_is_detected_and_left_to_jax(calls, monkeypatch):
  for k, v in SRUN_2_TASKS.items():
    monkeypatch.setenv(k, v)
  assert distributed.under_srun()
  assert distributed.initialize() is True
  # JAX's SLURM cluster reads the coordinator, process count and id from the environment itself.
  assert calls["initialize"] == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                                  "local_device_ids": None, "initialization_timeout": 300,
                                  "heartbeat_timeout_seconds": 150}]
  # No GPUs allocated (a CPU job): JAX's default is left alone.
  assert jax_would_use(calls["initialize"][0]) == ("gpu001:%d" % (4242 % 4096 + 61440), 2, 1, [0])


# srun shapes on 2 nodes x 8 GPUs: (task variables, GPU variables) -> the GPU ordinals the task must drive.
SHAPES = {
    # --ntasks-per-node=1 --gpus-per-node=8: one process per node drives all 8. JAX's default would be [0].
    "one task per node": ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                           "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
                          {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"},
                          list(range(8))),
    # The same, where the GPU plugin sets only SLURM's own variables.
    "one task per node, no CUDA_VISIBLE_DEVICES": (
        {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_STEP_NUM_NODES": "2"}, {"SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7"}, list(range(8))),
    # --ntasks-per-node=8 --gpus-per-node=8, tasks share the node's GPUs: local task 5 drives GPU 5 (JAX's default too).
    "one task per GPU, shared": ({"SLURM_NTASKS": "16", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
                                  "SLURM_STEP_TASKS_PER_NODE": "8(x2)"},
                                 {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"}, [5]),
    # --gpus-per-task=1 (or --gpu-bind): each task sees only its GPU, as ordinal 0; JAX's default [5] does not exist.
    "one task per GPU, bound": ({"SLURM_NTASKS": "16", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
                                 "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, {"CUDA_VISIBLE_DEVICES": "5"}, [0]),
    # 2 tasks per node with 4 GPUs each.
    "two tasks per node": ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                            "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
                           [4, 5, 6, 7]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_srun_gpu_launch_shapes_drive_every_gpu(calls, monkeypatch, shape):
  tasks, gpus, want = SHAPES[shape]
  for k, v in {**SRUN_2_TASKS, **tasks, **gpus}.items():
    monkeypatch.setenv(k, v)
  assert distributed.initialize() is True
  (kw,) = calls["initialize"]
  assert kw["local_device_ids"] == want
  coordinator, n, pid, local = jax_would_use(kw)
  assert (coordinator.split(":")[0], n, pid, local) == ("gpu001", int(tasks["SLURM_NTASKS"]),
                                                         int(tasks["SLURM_PROCID"]), want)


def test_jax_local_device_ids_wins_and_uneven_gpu_shares_are_refused(calls, monkeypatch):
  tasks, gpus, _ = SHAPES["two tasks per node"]
  for k, v in {**SRUN_2_TASKS, **tasks, **gpus, "JAX_LOCAL_DEVICE_IDS": "2,3"}.items():
    monkeypatch.setenv(k, v)
  distributed.initialize()
  assert calls["initialize"][0]["local_device_ids"] is None  # JAX reads JAX_LOCAL_DEVICE_IDS itself
  monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "3(x2)")
  with pytest.raises(ConfigError, match="3 tasks on this node, which share 8 visible GPUs"):
    distributed.initialize()


@dataclasses.dataclass
class FakeDevice:
  process_index: int
  platform: str = "gpu"


def recipe(data: int) -> "Config":
  cfg = load_config("ar_stablelm_2_1_6b")
  return cfg.replace(mesh=dataclasses.replace(cfg.mesh, data=data, model=1))


def test_launch_line_and_a_mesh_the_launch_cannot_fill(monkeypatch):
  for var in (*SRUN_2_TASKS, *SLURM_GPU_VARS):
    monkeypatch.delenv(var, raising=False)
  sixteen = [FakeDevice(p) for p in range(2) for _ in range(8)]
  assert distributed.check_launch(recipe(16), sixteen, 8) == "launch: 2 process(es) x 8 local gpu device(s) = 16 devices"
  # The defect this guards: one task per node that got one GPU each.
  with pytest.raises(ConfigError, match=r"mesh: data=16 x model=1 needs 16 devices, but this launch joined "
                                        r"2 process\(es\) x 1 local gpu device\(s\) = 2 devices"):
    distributed.check_launch(recipe(16), [FakeDevice(0), FakeDevice(1)], 1)
  with pytest.raises(ConfigError, match=r"uneven: 2 process\(es\) x local gpu devices 8\+4"):
    distributed.check_launch(recipe(-1), sixteen[:12], 8)


def test_srun_task_that_drives_fewer_gpus_than_it_was_given_is_refused(monkeypatch):
  tasks, gpus, _ = SHAPES["one task per node"]
  for k, v in {**SRUN_2_TASKS, **tasks, **gpus}.items():
    monkeypatch.setenv(k, v)
  two = [FakeDevice(0), FakeDevice(1)]
  # mesh.data=-1 would quietly train on the 2 GPUs that joined.
  with pytest.raises(ConfigError, match=r"this srun task drives 1 GPU\(s\) but SLURM gave it 8"):
    distributed.check_launch(recipe(-1), two, 1)


def test_cloud_tpu_vm_is_detected_and_left_to_jax(calls, monkeypatch):
  from jax._src import cloud_tpu_init
  assert distributed.on_cloud_tpu_vm() is False  # this CPU host
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)  # what `import jax` sets on a TPU VM
  assert distributed.initialize() is True
  # JAX's Cloud TPU cluster reads the workers and this host's index from the GCE metadata itself.
  assert calls["initialize"] == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                                  "local_device_ids": None, "initialization_timeout": 300,
                                  "heartbeat_timeout_seconds": distributed.jax_heartbeat_timeout_s(60)}]


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
