"""Multi-host start-up: `jax.distributed.initialize` from explicit flags, or SLURM / Cloud TPU auto-detection.

Must run before anything touches a JAX backend (`jax.devices()`, `jax.default_backend()`, any
array): JAX refuses to join a cluster once its backends exist.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from ar_lm_jax.config import ConfigError


def under_srun() -> bool:
  """True inside an `srun` step of several tasks (the variables JAX's SLURM detection reads)."""
  # SLURM_STEP_NODELIST is set by srun only: a plain `salloc` shell has SLURM_JOB_ID and
  # SLURM_NTASKS too, and joining there would wait forever for processes that never start.
  needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  return all(v in os.environ for v in needed) and int(os.environ["SLURM_NTASKS"]) > 1


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (JAX found TPU chips and libtpu when it was imported), where JAX reads the slice's hosts itself."""
  from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel  # the flag `import jax` sets; no public API
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, cpu_collectives: str = "gloo",
               initialization_timeout_s: int = 300) -> bool:
  """Joins the job's processes; returns whether this is a multi-process run.

  Explicit flags win; under `srun` JAX reads SLURM's variables itself. Single-process
  runs (no flags, no srun) skip this entirely.
  """
  explicit = (coordinator_address, num_processes, process_id)
  # On a TPU VM, jax.distributed.initialize() with no arguments finds the slice's workers in the GCE
  # metadata (docs/tpu.md); orbax's multi-host barriers need the client it starts.
  if all(v is None for v in explicit) and not under_srun() and not on_cloud_tpu_vm():
    return False
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("--coordinator_address, --num_processes and --process_id must be given together")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    if ":" not in coordinator_address:
      raise ConfigError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT")
  # CPU processes need a collectives backend to all-reduce across hosts. Set it unconditionally:
  # asking which backend is in use would initialize it, and the option is ignored on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=initialization_timeout_s)
  return True
