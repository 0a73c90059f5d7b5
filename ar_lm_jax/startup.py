"""What happens before a JAX backend starts: the GPU XLA flags, then joining the job's processes.

Every entry point calls `start(...)` first, after parsing its flags: XLA reads XLA_FLAGS once,
when a backend starts, and JAX refuses to join a cluster once its backends exist
(`jax.devices()`, `jax.default_backend()`, any array). This module imports jax only inside
`initialize`, after the flags are set.

What runs once the processes joined (the launch check, the peer watch, leaving after an error)
is in `distributed.py`.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from ar_lm_jax.config import ConfigError


def start(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
          process_id: Optional[int] = None, *, multiprocess: bool = True, peer_timeout_s: int = 60) -> bool:
  """Sets the GPU XLA flags, then (with `multiprocess`) joins the job's processes; returns whether it is multi-process.

  Commands that always run as one process (evaluate, generate, the converters, the benchmark)
  pass multiprocess=False: under `srun` or on a TPU VM they must not wait for peers.
  """
  apply_gpu_xla_flags()
  if not multiprocess:
    return False
  return initialize(coordinator_address, num_processes, process_id, peer_timeout_s=peer_timeout_s)


# ---------------------------------------------------------------------------
# XLA flags.

# Set on GPU only, before the backend starts (XLA reads XLA_FLAGS once). The set MaxText and
# NVIDIA's JAX-Toolbox recommend for transformer training on H100; docs/performance.md says why
# each one is there.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # schedule async collectives/copies to overlap compute
    "--xla_gpu_enable_triton_gemm=false",  # cuBLAS(Lt) for the dense GEMMs; Triton GEMM autotuning costs compile time for no gain
    "--xla_gpu_enable_highest_priority_async_stream=true",  # collectives never queue behind compute kernels
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",  # fewer, larger gradient all-reduces (data parallel)
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",  # fewer, larger parameter all-gathers (FSDP)
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",  # fewer, larger reduce-scatters (ZeRO / FSDP)
    "--xla_gpu_enable_pipelined_all_gather=true",  # prefetch the next scanned layer's weights during this one
    "--xla_gpu_enable_pipelined_reduce_scatter=true",  # and push its gradients out during the next
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",  # lets the scan over layers overlap iterations' transfers
)


def gpu_present() -> bool:
  """Whether a CUDA device is visible, decided without starting a JAX backend."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("cpu", "tpu"):
    return False
  if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
    return False
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def apply_gpu_xla_flags() -> list[str]:
  """Adds GPU_XLA_FLAGS to XLA_FLAGS when a GPU is present; flags the user already set win.

  Must run before JAX starts its backend: `start` calls it first thing.
  Returns the flags added.
  """
  if not gpu_present():
    return []
  current = os.environ.get("XLA_FLAGS", "")
  have = {f.split("=")[0] for f in current.split()}
  added = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in have]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


# ---------------------------------------------------------------------------
# Joining: explicit flags, or an `srun` step in either launch shape.


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


def _expand_tasks_per_node(text: str) -> list[int]:
  """SLURM's compressed counts, e.g. '8(x2),4' -> [8, 8, 4]."""
  out = []
  for part in text.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not m:
      raise ConfigError(f"cannot parse SLURM's tasks per node {text!r}")
    out += [int(m.group(1))] * int(m.group(2) or 1)
  return out


def slurm_tasks_on_this_node() -> int:
  env = os.environ
  for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(var):
      counts = _expand_tasks_per_node(env[var])
      node = int(env.get("SLURM_NODEID", "0"))
      return counts[node] if node < len(counts) else counts[-1]
  if env.get("SLURM_NTASKS_PER_NODE"):
    return int(env["SLURM_NTASKS_PER_NODE"])
  nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
  return max(1, int(env["SLURM_NTASKS"]) // nodes)


def slurm_visible_gpus() -> Optional[int]:
  """How many GPUs this task's CUDA runtime will list (None: no GPU was allocated, a CPU or TPU job).

  SLURM's gres plugin sets CUDA_VISIBLE_DEVICES to the task's GPUs (one per task with
  --gpus-per-task=1 or --gpu-bind, the node's allocation otherwise); the SLURM_* GPU variables are
  read only when it is missing.
  """
  env = os.environ
  cvd = env.get("CUDA_VISIBLE_DEVICES")
  if cvd is not None and cvd.strip() and cvd.strip() != "NoDevFiles":
    return len([x for x in cvd.split(",") if x.strip()])
  for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
    if env.get(var, "").strip():
      return len(env[var].split(","))
  if env.get("SLURM_GPUS_ON_NODE", "").strip():
    return int(env["SLURM_GPUS_ON_NODE"])
  return None


def slurm_local_device_ids() -> Optional[list[int]]:
  """The GPU ordinals this `srun` task drives, for `jax.distributed.initialize(local_device_ids=)`.

  JAX's SLURM detection defaults to `[SLURM_LOCALID]`: right for one task per GPU on a node whose
  tasks all see every GPU, but one GPU per node for `--ntasks-per-node=1 --gpus-per-node=8`, and a
  GPU ordinal that does not exist when SLURM binds each task to its own GPU (it then sees only
  ordinal 0). Here: one task per node drives every visible GPU; k tasks on a node that see one GPU
  each drive that one; k tasks that share g visible GPUs split them, g/k each, by SLURM_LOCALID.
  None leaves the choice to JAX (no GPUs allocated: a CPU or TPU job).
  """
  gpus = slurm_visible_gpus()
  if gpus is None:
    return None
  tasks = slurm_tasks_on_this_node()
  if tasks == 1 or gpus == 1:
    return list(range(gpus))
  if gpus % tasks:
    raise ConfigError(f"srun started {tasks} tasks on this node, which share {gpus} visible GPUs: give each task "
                      "the same number (e.g. --ntasks-per-node=1 with all GPUs, or one task per GPU)")
  per_task = gpus // tasks
  local = int(os.environ["SLURM_LOCALID"])
  return list(range(local * per_task, (local + 1) * per_task))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, cpu_collectives: str = "gloo",
               initialization_timeout_s: int = 300, peer_timeout_s: int = 60) -> bool:
  """Joins the job's processes and starts the peer watch; returns whether this is a multi-process run.

  Explicit flags win; under `srun` JAX reads the coordinator and process ids from SLURM's variables
  and the local GPUs come from `slurm_local_device_ids` (JAX_LOCAL_DEVICE_IDS, if set, wins over
  both). Single-process runs (no flags, no srun) skip this entirely.
  """
  import jax  # here, not at the top: importing this module touches no jax before `start` set the flags
  explicit = (coordinator_address, num_processes, process_id)
  srun = all(v is None for v in explicit) and under_srun()
  # On a TPU VM, jax.distributed.initialize() with no arguments finds the slice's workers in the GCE
  # metadata (docs/tpu.md); orbax's multi-host barriers need the client it starts.
  if all(v is None for v in explicit) and not srun and not on_cloud_tpu_vm():
    return False
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("--coordinator_address, --num_processes and --process_id must be given together")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    if ":" not in coordinator_address:
      raise ConfigError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT")
  local_device_ids = slurm_local_device_ids() if srun and not os.environ.get("JAX_LOCAL_DEVICE_IDS") else None
  # CPU processes need a collectives backend to all-reduce across hosts. Set it unconditionally:
  # asking which backend is in use would initialize it, and the option is ignored on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  # JAX's own heartbeat timeout aborts every survivor with a C++ check failure; it must fire well
  # after PeerWatch has had its chance to exit with one line.
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout_s,
                             heartbeat_timeout_seconds=jax_heartbeat_timeout_s(peer_timeout_s))
  from ar_lm_jax import distributed  # imports jax: only once the flags are set
  distributed.start_watch(peer_timeout_s)
  return True


def jax_heartbeat_timeout_s(peer_timeout_s: int) -> int:
  return max(100, 2 * peer_timeout_s + 30)
