"""Multi-host start-up: `jax.distributed.initialize` from explicit flags, or SLURM auto-detection."""

from __future__ import annotations

import os
from typing import Optional

import jax

from ar_lm_jax.config import ConfigError


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, cpu_collectives: Optional[str] = None) -> None:
  """Joins the job's processes. Explicit flags win; under `srun` JAX reads SLURM's variables itself.

  Single-process runs (no flags, no SLURM) skip this entirely.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("--coordinator_address, --num_processes and --process_id must be given together")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} is not in [0, {num_processes})")
  if cpu_collectives or (any(v is not None for v in explicit) and jax.default_backend() == "cpu"):
    # CPU processes need a collectives backend to all-reduce across hosts.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
  if any(v is not None for v in explicit):
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
