"""Cloud TPU slices by name (`v5p-16`, `v5litepod-16`, ...) as abstract devices that XLA:TPU compiles for on any host.

With libtpu installed (`pip install -r requirements-tpu.txt`), `devices(lookup("v5p-16"))`
gives the 8 chips of that slice as compile-only devices (`jax.experimental.topologies`):
`jit(...).lower(...).compile()` against a mesh of them runs the real TPU compiler with
its real memory model on a CPU-only machine, and allocates nothing. MaxText's
`train_compile.py` catches out-of-memory launches the same way.

Cloud TPU names count TensorCores for v4 and v5p (2 per chip, `v5p-16` = 8 chips, one
JAX device per chip in megacore mode) and chips for v5e (`v5litepod-N`) and v6e.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Optional

from ar_lm_jax.config import ConfigError

GiB = 2 ** 30

INSTALL_HINT = ('--target compiles with libtpu, which is not installed here: '
                'python -m venv venv-tpu && venv-tpu/bin/pip install -r requirements.txt -r requirements-tpu.txt')


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, with the Cloud TPU data-sheet figures per chip (the compiler reports the exact usable HBM)."""
  slice_prefix: str  # Cloud TPU slice name prefix: v4, v5p, v5litepod, v6e
  topology_prefix: str  # libtpu's topology name prefix: v4, v5p, v5e, v6e
  device_kind: str  # jax Device.device_kind of one chip
  chip_config: str  # megacore (two TensorCores as one device) or default
  names_count_cores: bool  # v4/v5p names count TensorCores (2 per chip); v5e/v6e names count chips
  hbm_bytes: int  # HBM per chip, data sheet
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip, data sheet


CHIPS = {
    "v4": Chip("v4", "v4", "TPU v4", "megacore", True, 32 * GiB, 275e12),
    "v5p": Chip("v5p", "v5p", "TPU v5", "megacore", True, 95 * GiB, 459e12),
    "v5litepod": Chip("v5litepod", "v5e", "TPU v5 lite", "default", False, 16 * GiB, 197e12),
    "v6e": Chip("v6e", "v6e", "TPU v6 lite", "default", False, 32 * GiB, 918e12),
}

# Chips in a slice -> (chip grid, chips per host). The 3D generations (v4, v5p) have 4 chips
# per host; v5e and v6e slices of up to 8 chips are one host (ct5lp-hightpu-8t,
# ct6e-standard-8t), larger ones 4 chips per host. Grids with a full ring in a dimension wrap.
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
             512: (8, 8, 8)}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  name: str  # Cloud TPU name, e.g. v5litepod-16
  chip: Chip
  grid: tuple[int, ...]  # chips along each dimension of the slice
  chips_per_host: tuple[int, int, int]  # chips on each host along each dimension
  wrap: tuple[bool, bool, bool]  # torus wrap-around links along each dimension

  @property
  def chips(self) -> int:
    n = 1
    for g in self.grid:
      n *= g
    return n

  @property
  def hosts(self) -> int:
    per_host = self.chips_per_host[0] * self.chips_per_host[1] * self.chips_per_host[2]
    return self.chips // per_host

  @property
  def topology_name(self) -> str:
    return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.grid))}"


def _slices() -> dict[str, TpuSlice]:
  out = {}
  for chip in CHIPS.values():
    if chip.names_count_cores:
      for chips, grid in _GRIDS_3D.items():
        out[f"{chip.slice_prefix}-{2 * chips}"] = TpuSlice(f"{chip.slice_prefix}-{2 * chips}", chip, grid, (2, 2, 1),
                                                           (chips >= 64,) * 3)
    else:
      for chips, grid in _GRIDS_2D.items():
        per_host = (grid[0], grid[1], 1) if chips <= 8 else (2, 2, 1)
        wrap = (grid[0] >= 16, grid[1] >= 16, False)
        out[f"{chip.slice_prefix}-{chips}"] = TpuSlice(f"{chip.slice_prefix}-{chips}", chip, grid, per_host, wrap)
  return out


SLICES = _slices()


def lookup(name: str) -> TpuSlice:
  """The slice a Cloud TPU name denotes; ConfigError (exit 2 at the command line) for a name not in the table."""
  if name not in SLICES:
    known = ", ".join(SLICES)
    raise ConfigError(f"--target: unknown TPU slice {name!r}; known: {known}")
  return SLICES[name]


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def prepare_environment(s: TpuSlice) -> None:
  """Environment for compiling on a host that is not (or not this) TPU VM; must run before jax is imported.

  JAX itself stays on CPU (the slice's devices come from the topology, so a TPU VM's own
  chips are never opened, and a CPU host logs no failed TPU start-up). libtpu would ask the
  GCE metadata server for the local slice and log the failure when there is none; the local
  slice is named here instead. libtpu also takes a per-host lock file (/tmp/libtpu_lockfile)
  that would fail a second dry run, or a dry run beside a training job, with ABORTED: a
  compile-only client needs no exclusive chips. Values already set win.
  """
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


# LIBTPU_INIT_ARGS for data-parallel / FSDP training (MaxText's set for v5e/v5p): overlap the gradient
# all-reduce and the FSDP all-gathers with compute. docs/tpu.md says what each does; libtpu aborts on
# an unknown flag, and tests/test_tpu_compile.py checks that these parse with the pinned libtpu.
RECOMMENDED_LIBTPU_INIT_ARGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)


def devices(s: TpuSlice) -> list:
  """The slice's chips as compile-only JAX devices, with the process (host) index each has on the real slice."""
  from jax.experimental import topologies
  grid = tuple(s.grid) + (1,) * (3 - len(s.grid))
  kwargs = {"wrap": s.wrap} if any(s.wrap) else {}
  topo = topologies.get_topology_desc(platform="tpu", topology_name=s.topology_name, chip_config_name=s.chip.chip_config,
                                      chips_per_host_bounds=s.chips_per_host, num_slices=1, **kwargs)
  devs = list(topo.devices)
  if len(devs) != s.chips or grid[0] * grid[1] * grid[2] != s.chips:  # the table and libtpu disagree: a bug here
    raise RuntimeError(f"{s.name}: libtpu gives {len(devs)} devices for {s.topology_name}, expected {s.chips}")
  return devs


# XLA:TPU's out-of-memory message at compile time, in the two forms libtpu uses:
#   "... the total memory required for HLO temporaries (39.65G) exceeds available HBM (15.75G)."
#   "Ran out of memory in memory space hbm. Used 39.65G of 15.75G hbm. Exceeded hbm capacity by 23.90G."
# Sizes are binary (G = GiB).
_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
_OOM_PATTERNS = (re.compile(r"required for [^(]*\(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)"),
                 re.compile(r"Used " + _SIZE + r" of " + _SIZE + r" hbm"))
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_out_of_memory(message: str) -> Optional[tuple[int, int]]:
  """(bytes needed, bytes of HBM available) from a RESOURCE_EXHAUSTED compile error, or None if it names neither."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      need, need_unit, have, have_unit = m.groups()
      return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])
  return None


def compiler_hbm_bytes(device) -> Optional[int]:
  """The HBM one chip offers to a program, as XLA:TPU itself counts it (a little under the data sheet).

  Compile-only devices have no memory_stats(), and the compiler names the capacity only
  when a program exceeds it: so ask it with a program whose input alone is 512 GiB
  (compiled in milliseconds, never run). Accurate to the 0.01 GiB the message prints.
  """
  import jax
  import jax.numpy as jnp
  too_big = jax.ShapeDtypeStruct((2 ** 19, 2 ** 20), jnp.uint8)
  fn = jax.jit(lambda x: x[:1, :1], in_shardings=jax.sharding.SingleDeviceSharding(device))
  try:
    fn.lower(too_big).compile()
  except jax.errors.JaxRuntimeError as e:
    parsed = parse_out_of_memory(str(e))
    return parsed[1] if parsed else None
  return None
