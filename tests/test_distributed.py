"""The launch check against the mesh: what joined, uneven launches, and an `srun` task that drives fewer
GPUs than SLURM gave it. How the processes join is tests/test_startup.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from slurm_testing import SHAPES, SLURM_GPU_VARS, SRUN_2_TASKS

from ar_lm_jax import distributed
from ar_lm_jax.config import Config, ConfigError, load_config


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
